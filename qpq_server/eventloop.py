"""The event loop the server runs on: uvloop when it is installed, else asyncio's own.

uvloop (the `fast` extra, `pip install 'qpq[fast]'`) runs the same code on libuv;
bench/ceiling.py --loops measures both in one run (bench/README.md has the figures).
`QPQ_EVENT_LOOP=asyncio` forces the standard loop (to rule uvloop out when debugging),
`QPQ_EVENT_LOOP=uvloop` requires it; unset or `auto` picks uvloop when importable.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from qpq_server.errors import ConfigError

__all__ = ["ENV", "loop_factory", "loop_name", "run"]

ENV = "QPQ_EVENT_LOOP"
_CHOICES = ("auto", "uvloop", "asyncio")

T = TypeVar("T")


def loop_name(value: str | None = None) -> str:
    """'uvloop' or 'asyncio' for a QPQ_EVENT_LOOP value (default: the environment's)."""
    choice = (os.environ.get(ENV, "auto") if value is None else value).strip().lower() or "auto"
    if choice not in _CHOICES:
        raise ConfigError(f"{ENV}={choice!r} is not one of {', '.join(_CHOICES)}")
    available = importlib.util.find_spec("uvloop") is not None
    if choice == "uvloop" and not available:
        raise ConfigError(f"{ENV}=uvloop but uvloop is not installed "
                          "(pip install 'qpq[fast]', or unset it)")
    if choice == "auto":
        return "uvloop" if available else "asyncio"
    return choice


def loop_factory(value: str | None = None) -> Callable[[], asyncio.AbstractEventLoop]:
    if loop_name(value) == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return asyncio.new_event_loop


def run(main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run on the chosen loop."""
    try:
        factory = loop_factory()
    except ConfigError:
        main.close()  # never started: no "coroutine was never awaited" warning
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
