"""A small lossy UDP relay for tests (the kernel's netem qdisc is not available here).

Clients send to `relay.address`; each client address gets its own upstream socket to
the server, so replies find their way back. Each datagram, in either direction, is
dropped with probability `drop`, else delivered after `delay_s`, plus, with probability
`reorder`, an extra 5-30 ms so that later datagrams overtake it. Counters prove the
faults happened.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field


@dataclass
class RelayCounters:
    received: int = 0
    dropped: int = 0
    reordered: int = 0
    forwarded: int = 0


@dataclass
class _Upstream(asyncio.DatagramProtocol):
    relay: UdpRelay
    client: tuple[str, int]
    transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.relay.forward(data, lambda d: self.relay.downstream_send(d, self.client))


@dataclass
class UdpRelay(asyncio.DatagramProtocol):
    server: tuple[str, int]
    drop: float = 0.05
    reorder: float = 0.05
    delay_s: float = 0.05
    seed: int = 17
    counters: RelayCounters = field(default_factory=RelayCounters)
    captured: list[bytes] | None = None
    """When a list, every client->server datagram is appended (fuzz seeds)."""
    _rng: random.Random = field(init=False)
    _down: asyncio.DatagramTransport | None = None
    _ups: dict[tuple[str, int], _Upstream] = field(default_factory=dict)
    _tasks: set[asyncio.Task[object]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    @property
    def address(self) -> str:
        assert self._down is not None
        host, port = self._down.get_extra_info("sockname")[:2]
        return f"{host}:{port}"

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(lambda: self, local_addr=("127.0.0.1", 0))

    def close(self) -> None:
        for up in self._ups.values():
            if up.transport is not None:
                up.transport.close()
        if self._down is not None:
            self._down.close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._down = transport  # type: ignore[assignment]

    def downstream_send(self, data: bytes, client: tuple[str, int]) -> None:
        if self._down is not None and not self._down.is_closing():
            self._down.sendto(data, client)

    def forward(self, data: bytes, send: object) -> None:
        """Drop, or deliver later (sometimes later still, to reorder)."""
        self.counters.received += 1
        if self._rng.random() < self.drop:
            self.counters.dropped += 1
            return
        delay = self.delay_s
        if self._rng.random() < self.reorder:
            self.counters.reordered += 1
            delay += self._rng.uniform(0.005, 0.03)
        self.counters.forwarded += 1
        asyncio.get_running_loop().call_later(delay, send, data)  # type: ignore[arg-type]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        up = self._ups.get(addr)
        if up is None:
            up = _Upstream(self, addr)
            self._ups[addr] = up
            loop = asyncio.get_running_loop()
            self._tasks.add(loop.create_task(loop.create_datagram_endpoint(
                lambda: up, remote_addr=self.server)))
        if self.captured is not None:
            self.captured.append(data)
        self.forward(data, lambda d: self._upstream_send(addr, d))

    def _upstream_send(self, addr: tuple[str, int], data: bytes) -> None:
        up = self._ups[addr]
        if up.transport is not None and not up.transport.is_closing():
            up.transport.sendto(data)
