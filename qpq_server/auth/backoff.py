"""Failed-login backoff per (account, source address).

A few failures pass, then each further one doubles the wait before the next attempt from
that address for that account. Keyed by address as well as account, so someone guessing
a user's password from one place cannot lock the real user out from another; every
guess still costs the guesser the client side of OPAQUE's key stretching.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from qpq_server.errors import RateLimited

__all__ = ["LoginBackoff"]


@dataclass
class _Failures:
    count: int = 0
    blocked_until: float = 0.0


class LoginBackoff:
    def __init__(self, burst: int = 5, base_s: float = 1.0, max_s: float = 900.0,
                 max_entries: int = 100_000) -> None:
        self._burst = burst
        self._base_s = base_s
        self._max_s = max_s
        self._max_entries = max_entries
        self._failures: OrderedDict[tuple[str, str], _Failures] = OrderedDict()

    def check(self, username: str, address: str, now: float) -> None:
        entry = self._failures.get((username, address))
        if entry is not None and now < entry.blocked_until:
            wait = entry.blocked_until - now
            raise RateLimited(f"too many failed logins for this account from this address; "
                              f"retry in {wait:.0f} s")

    def failed(self, username: str, address: str, now: float) -> None:
        key = (username, address)
        entry = self._failures.setdefault(key, _Failures())
        self._failures.move_to_end(key)
        if len(self._failures) > self._max_entries:
            self._failures.popitem(last=False)
        entry.count += 1
        over = entry.count - self._burst
        if over > 0:
            entry.blocked_until = now + min(self._max_s, self._base_s * 2 ** min(over - 1, 30))

    def succeeded(self, username: str, address: str) -> None:
        self._failures.pop((username, address), None)
