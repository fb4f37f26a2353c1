"""`user@domain` addresses: a bare name is local, so is `user@OWN_DOMAIN`."""

from __future__ import annotations

import re

from qpq_server.errors import BadRequest
from qpq_server.protocol.validate import USERNAME_RE, USERNAME_RULE

__all__ = ["DOMAIN_RE", "OUTBOX_PREFIX", "outbox_mailbox", "split_address"]

DOMAIN_RE = re.compile(r"^(?=.{1,253}\Z)[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
                       r"(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*\Z")
OUTBOX_PREFIX = "@fed:"
"""A peer's outbound queue is a mailbox named `@fed:DOMAIN` in the ordinary message
store: no username can contain '@' or ':', so it never meets a user's mailbox, and it
is as durable as every mailbox on every backend."""


def outbox_mailbox(domain: str) -> str:
    return OUTBOX_PREFIX + domain


def split_address(value: str, own_domain: str) -> tuple[str, str | None]:
    """(user, None) for a local address, (user, domain) for another domain's."""
    user, sep, domain = value.partition("@")
    if not USERNAME_RE.match(user):
        raise BadRequest(f"{value!r}: the user part must be {USERNAME_RULE}")
    if not sep:
        return user, None
    domain = domain.lower()
    if not DOMAIN_RE.match(domain):
        raise BadRequest(f"{value!r}: {domain!r} is not a domain name")
    return (user, None) if domain == own_domain else (user, domain)
