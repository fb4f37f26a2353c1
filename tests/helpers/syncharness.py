"""The in-process dispatch harness driven from synchronous code (hypothesis tests).

Hypothesis runs many examples per test, and a stateful machine's rules are plain
methods, so the harness lives on its own event loop here and `run()` drives one
coroutine to completion on it. One data dir serves every example of a test: examples
keep apart by using fresh usernames.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from qpq_server.storage.base import Storage
from tests.helpers.dispatch import Harness, harness

T = TypeVar("T")


class SyncHarness:
    def __init__(self, loop: asyncio.AbstractEventLoop, h: Harness) -> None:
        self.loop = loop
        self.h = h
        self._names = itertools.count()

    def run(self, coro: Awaitable[T]) -> T:
        return self.loop.run_until_complete(coro)

    def fresh_name(self, stem: str = "u") -> str:
        return f"{stem}{next(self._names)}"


@contextmanager
def sync_harness(tmp_path: Path, wrap_storage: Callable[[Storage], Storage] | None = None,
                 **sections: Any) -> Iterator[SyncHarness]:
    loop = asyncio.new_event_loop()
    agen = harness(tmp_path, wrap_storage, **sections)
    try:
        h = loop.run_until_complete(agen.__anext__())
        try:
            yield SyncHarness(loop, h)
        finally:
            loop.run_until_complete(agen.aclose())
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
