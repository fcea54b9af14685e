"""admission-sidecar: a Redis-backed, stateless admission controller for LLM inference gateways."""

__version__ = "0.1.0"
