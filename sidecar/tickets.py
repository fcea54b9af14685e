"""Signed admission tickets: a slot's item id plus an HMAC, so no client can mint or guess one.

A ticket is ``<item id>.<signature>``. The signature is base64url (no padding) of
HMAC-SHA256(secret, pool + "\\0" + item id), truncated to SIGNATURE_BYTES. The pool is signed too,
so a ticket of one pool is refused by another pool's replicas even when they share a secret.

Tickets outlive the replica that issued them and may be released or renewed through any replica
of the pool, so all replicas of a pool must share the secret. Without one, each process makes its
own and its tickets work only on itself.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import secrets

log = logging.getLogger(__name__)

# 16 bytes (128 bits) is the least the ticket format allows; more buys nothing against guessing.
SIGNATURE_BYTES = 16
# Item ids are short; anything much longer is not a ticket and is refused before any hashing.
MAX_TICKET_CHARS = 256
GENERATED_SECRET_BYTES = 32


class TicketSigner:
    """Issues and verifies the tickets of one pool."""

    def __init__(self, secret: bytes, pool: str) -> None:
        if not secret:
            raise ValueError("the ticket secret is empty")
        self._secret = secret
        self._pool = pool.encode()

    def __repr__(self) -> str:
        return f"TicketSigner(pool={self._pool.decode()!r}, secret=***)"

    def _signature(self, item_id: str) -> bytes:
        # surrogatepass: a forged id may hold lone surrogates (JSON allows them); it must not raise.
        message = self._pool + b"\0" + item_id.encode("utf-8", "surrogatepass")
        mac = hmac.new(self._secret, message, hashlib.sha256)
        return base64.urlsafe_b64encode(mac.digest()[:SIGNATURE_BYTES]).rstrip(b"=")

    def issue(self, item_id: str) -> str:
        return f"{item_id}.{self._signature(item_id).decode()}"

    def verify(self, ticket: str) -> str | None:
        """The item id of a ticket this pool issued; None for anything else."""
        if len(ticket) > MAX_TICKET_CHARS:
            return None
        item_id, dot, signature = ticket.rpartition(".")
        if not dot or not item_id:
            return None
        # "replace": a non-ASCII signature cannot match, but must not raise either.
        given = signature.encode("ascii", "replace")
        if not hmac.compare_digest(given, self._signature(item_id)):
            return None
        return item_id


def ticket_signer(secret: bytes | None, pool: str) -> TicketSigner:
    """The pool's signer; with no configured secret, one made for this process (and a warning)."""
    if secret is None:
        log.warning(
            "no ticket secret configured (SIDECAR_TICKET_SECRET or --ticket-secret-file): using a "
            "random one for this process, so its tickets can be released or renewed only through "
            "this replica and stop working when it restarts; give all replicas of pool %s the "
            "same secret",
            pool,
        )
        secret = secrets.token_bytes(GENERATED_SECRET_BYTES)
    return TicketSigner(secret, pool)
