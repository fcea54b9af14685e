# syntax=docker/dockerfile:1
# admission-sidecar image: a builder stage makes the wheels and a virtualenv; the runtime stage is a
# slim Python with only that virtualenv, run as an unprivileged user.
#
#   docker build -t admission-sidecar .
#   docker run --rm -p 8080:8080 -p 9090:9090 admission-sidecar \
#       serve --listen 0.0.0.0:8080 --admin-listen 0.0.0.0:9090 \
#       --redis-url redis://redis:6379/0 --upstream http://model-server:8000
#
# The default CMD passes --listen/--admin-listen as flags, and flags win over SIDECAR_LISTEN /
# SIDECAR_ADMIN_LISTEN: to set those through the environment, override the command with just `serve`.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# Only what the wheel is built from (.dockerignore keeps the rest of the tree out of the context).
# hatchling copies lua/ into the wheel as sidecar/lua (see [tool.hatch.build.targets.wheel]).
COPY pyproject.toml README.md ./
COPY lua ./lua
COPY sidecar ./sidecar

# One wheel per distribution: the project, its dependencies and the `fast` extra (uvloop). The
# virtualenv is then installed from those wheels only, so it holds exactly what was built here.
# pip compiles the .pyc files at install time, so the read-only runtime never needs to write them.
RUN pip wheel ".[fast]" --wheel-dir /wheels \
    && python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-index --find-links /wheels \
        "$(ls /wheels/admission_sidecar-*.whl)[fast]"


FROM ${PYTHON_IMAGE} AS runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH

# A fixed numeric uid/gid, so Kubernetes' runAsNonRoot can verify it without a runAsUser.
RUN groupadd --system --gid 10001 sidecar \
    && useradd --system --uid 10001 --gid sidecar --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin sidecar

# Same base image as the builder, so the virtualenv's interpreter symlinks stay valid.
COPY --from=builder /opt/venv /opt/venv

USER 10001:10001

# 8080: proxy, admission API and gateway check; 9090: admin (/metrics, /healthz, /readyz, /state).
EXPOSE 8080 9090

# No HEALTHCHECK: the image is meant for Kubernetes, which ignores Docker's HEALTHCHECK and probes
# the admin port instead (readinessProbe /readyz, livenessProbe /healthz on 9090, see k8s/).
# The entry point runs as PID 1 and handles SIGTERM itself: not ready at once, then it drains
# admitted requests for server.shutdownGracePeriod.
ENTRYPOINT ["admission-sidecar"]
CMD ["serve", "--listen", "0.0.0.0:8080", "--admin-listen", "0.0.0.0:9090"]
