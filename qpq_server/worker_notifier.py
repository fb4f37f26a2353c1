"""Delivery wake-ups across the worker processes of one host.

A message enqueued on worker A must wake a long-poll parked on worker B. Each worker
binds an abstract-namespace unix datagram socket named after the deployment and its
index; `notify` wakes local waiters at once and sends the recipients, in one datagram,
to every sibling, which wakes its own. Nothing polls. A datagram a sibling cannot take
(it is restarting, or its buffer is full) is dropped: its parked fetches then end at
their `wait_s` and the client fetches again, so nothing is lost, only late.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterable

import msgpack

from qpq_server.notifier import InProcessNotifier

__all__ = ["WorkerNotifier"]

log = logging.getLogger("qpq.notify")

_MAX_DATAGRAM = 65536


def _address(group: str, index: int) -> str:
    return f"\0qpq-{group}-notify-{index}"


class WorkerNotifier:
    def __init__(self, group: str, index: int, count: int) -> None:
        self._group = group
        self._index = index
        self._count = count
        self._local = InProcessNotifier()
        self._sock: socket.socket | None = None

    @property
    def waiting(self) -> int:
        return self._local.waiting

    def start(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.setblocking(False)
        sock.bind(_address(self._group, self._index))
        asyncio.get_running_loop().add_reader(sock.fileno(), self._readable)
        self._sock = sock

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None

    def _readable(self) -> None:
        assert self._sock is not None
        while True:
            try:
                data = self._sock.recv(_MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            try:
                recipients = msgpack.unpackb(data, raw=False)
            except (ValueError, msgpack.UnpackException):  # only siblings reach it; be safe
                continue
            if isinstance(recipients, list):
                self._local.notify(r for r in recipients if isinstance(r, str))

    def notify(self, recipients: Iterable[str]) -> None:
        names = list(recipients)
        self._local.notify(names)
        if self._sock is None or self._count <= 1:
            return
        data = msgpack.packb(names, use_bin_type=True)
        for index in range(self._count):
            if index == self._index:
                continue
            with contextlib.suppress(OSError):  # sibling away or full: see module doc
                self._sock.sendto(data, _address(self._group, index))

    async def wait(self, recipient: str, timeout: float) -> bool:
        return await self._local.wait(recipient, timeout)

    def wake_all(self) -> None:
        self._local.wake_all()
