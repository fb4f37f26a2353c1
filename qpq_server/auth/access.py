"""The server-wide access token, compared in constant time.

During rotation the server holds the current and the previous token; both pass.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

from qpq_server.secrets import Secret

__all__ = ["AccessTokens"]


class AccessTokens:
    def __init__(self, tokens: Sequence[Secret]) -> None:
        self._tokens = tuple(t.reveal().encode() for t in tokens if t)

    def replace(self, tokens: Sequence[Secret]) -> None:
        self._tokens = tuple(t.reveal().encode() for t in tokens if t)

    def check(self, presented: str) -> bool:
        return self.match(presented) is not None

    def match(self, presented: str) -> str | None:
        """The id of the configured token that `presented` equals, or None. The id (a
        hash prefix, never the token) lets a reload find connections on a revoked one."""
        candidate = presented.encode()
        found: bytes | None = None
        for token in self._tokens:
            # No early exit: every configured token is compared every time.
            if hmac.compare_digest(candidate, token):
                found = token
        return _token_id(found) if found is not None else None

    def is_current(self, token_id: str | None) -> bool:
        return token_id is not None and token_id in {_token_id(t) for t in self._tokens}

    def __repr__(self) -> str:
        return f"AccessTokens(count={len(self._tokens)})"


def _token_id(token: bytes) -> str:
    return hashlib.sha256(b"qpq-token-id:" + token).hexdigest()[:16]
