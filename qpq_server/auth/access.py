"""The server-wide access token, compared in constant time.

During rotation the server holds the current and the previous token; both pass.
"""

from __future__ import annotations

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
        candidate = presented.encode()
        ok = False
        for token in self._tokens:
            # No early exit: every configured token is compared every time.
            ok |= hmac.compare_digest(candidate, token)
        return ok

    def __repr__(self) -> str:
        return f"AccessTokens(count={len(self._tokens)})"
