"""Raw random and mutated datagrams at the server's UDP port.

Seeds are a real client's datagrams (captured by the test relay while it registers,
logs in and sends); they are replayed mutated from many source ports, together with
random bytes and QUIC-looking headers. The server must stay up and keep serving a
well-behaved client; its log must show no unexpected traceback.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
from pathlib import Path

from qpq_server.client import connect
from tests.helpers.rawclient import session
from tests.helpers.server import running_server
from tests.helpers.udp_relay import UdpRelay

SOAK = os.environ.get("QPQ_SOAK") == "1"
DATAGRAMS = 50_000 if SOAK else 1_500


def mutate(rng: random.Random, seed: bytes) -> bytes:
    buf = bytearray(seed)
    for _ in range(rng.randint(1, 6)):
        choice = rng.random()
        at = rng.randrange(len(buf)) if buf else 0
        if choice < 0.4 and buf:
            buf[at] ^= 1 << rng.randrange(8)
        elif choice < 0.6:
            del buf[at:at + rng.randint(1, 64)]
        elif choice < 0.8:
            buf[at:at] = os.urandom(rng.randint(1, 32))
        elif buf:
            buf[at] = rng.choice([0x00, 0xFF, 0xC0, 0x40, 0x80])
    return bytes(buf)


async def test_random_and_mutated_datagrams_do_not_hurt_the_server(tmp_path: Path) -> None:
    rng = random.Random(17)
    with running_server(tmp_path, overrides={"rate_limit": {"enabled": False}}) as srv:
        captured: list[bytes] = []
        relay = UdpRelay(("127.0.0.1", srv.quic_port), drop=0.0, reorder=0.0, delay_s=0.0)
        relay.captured = captured
        await relay.start()
        try:
            async with connect(relay.address, srv.auth_token, ca=srv.ca_cert,
                               server_name="localhost", timeout=10) as conn:
                alice = await session(conn, "alice")
                await conn.call("enqueue", session=alice, recipients=["alice"], payload=b"x")
        finally:
            relay.close()
        assert len(captured) >= 5
        socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(16)]
        try:
            for i in range(DATAGRAMS):
                kind = rng.random()
                if kind < 0.7:
                    data = mutate(rng, rng.choice(captured))
                elif kind < 0.85:
                    data = os.urandom(rng.randint(0, 1500))
                else:  # a long-header Initial-looking packet with random rest
                    data = bytes([0xC0 | rng.randrange(16)]) + b"\x00\x00\x00\x01" + os.urandom(
                        rng.randint(0, 1300))
                socks[i % len(socks)].sendto(data, ("127.0.0.1", srv.quic_port))
                if i % 200 == 0:
                    await asyncio.sleep(0.01)  # let the server breathe: this is not a flood test
        finally:
            for s in socks:
                s.close()
        assert srv.process.poll() is None
        async with connect(srv.address, srv.auth_token, ca=srv.ca_cert,
                           server_name="localhost", timeout=20) as conn:
            bob = await session(conn, "bob")
            r = await conn.call("fetch", session=bob)
            assert r["messages"] == []
        log = srv.log()
    assert "Traceback" not in log, log[-3000:]
