"""QUIC flood defences: half-open handshakes are capped and timed out; retry validates."""

from __future__ import annotations

import socket
import time
from pathlib import Path

from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

from qpq_server.devserver import RunningServer, running_server, wait_until


def send_half_open_handshakes(srv: RunningServer, count: int) -> socket.socket:
    """Send only the client's first flight for `count` connections, then go silent."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    addr = ("127.0.0.1", srv.quic_port)
    for _ in range(count):
        quic = QuicConnection(configuration=QuicConfiguration(
            is_client=True, alpn_protocols=["qpq/1"], server_name="localhost"))
        quic.connect(addr, now=time.monotonic())
        for data, _ in quic.datagrams_to_send(now=time.monotonic()):
            sock.sendto(data, addr)
    return sock


async def test_half_open_handshakes_are_capped_then_timed_out(tmp_path: Path) -> None:
    overrides = {"quic": {"max_handshakes_in_flight": 4, "handshake_timeout_s": 1.0,
                          "retry": "never"}}
    with running_server(tmp_path, overrides=overrides) as srv:
        sock = send_half_open_handshakes(srv, 10)
        try:
            refused = "qpq_connections_refused_total"
            wait_until(lambda: srv.metric(refused, reason="handshakes") >= 6, 5,
                       "6 handshakes refused (4 admitted, the rest refused)")
            wait_until(lambda: srv.metric(refused, reason="handshake_timeout") >= 4, 10,
                       "the 4 admitted half-open handshakes timing out")
            # once the half-open ones are gone, a real client gets in
            async with srv.connect() as conn:
                assert (await conn.call("ping"))["ok"]
        finally:
            sock.close()


async def test_retry_always_still_serves_real_clients(tmp_path: Path) -> None:
    with running_server(tmp_path, overrides={"quic": {"retry": "always"}}) as srv:
        async with srv.connect() as conn:
            assert (await conn.call("ping"))["ok"]
