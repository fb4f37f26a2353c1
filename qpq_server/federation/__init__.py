"""Federation: qpq servers of different domains relay to each other.

`address` splits `user@domain`; `certs` makes and checks the federation CA's
certificates; `auth` is the in-channel peer authentication; `link` is the outbound
connection to a peer, `listener` the inbound one; `outbox` is the durable per-peer
queue and its relayer; `inbound` delivers what a peer relays; `hub` ties them to the
messaging service. The wire protocol is described in docs/protocol.md.
"""

from __future__ import annotations

ALPN = "qpq-fed/1"
"""The federation listener's ALPN: distinct from the client protocol's `qpq/1`, so a
client can never speak to it by accident, nor a peer to the client listener."""

__all__ = ["ALPN"]
