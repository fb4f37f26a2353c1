"""The handshake state release (transport/handshake_state.py) against the pinned aioquic.

It reaches into aioquic's private attributes, so these fail when an aioquic upgrade
changes them: the version, the three CRYPTO buffers and their size, the discarded
epochs at `HandshakeCompleted` on a server. A real aioquic server and client on
loopback then keep exchanging data after the release.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from pathlib import Path

import aioquic
from aioquic.asyncio import QuicConnectionProtocol, connect, serve
from aioquic.quic import connection as aioquic_connection
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import HandshakeCompleted, QuicEvent, StreamDataReceived
from aioquic.tls import Epoch

from qpq_server.devserver import free_port
from qpq_server.tls import write_self_signed
from qpq_server.transport.handshake_state import (
    AIOQUIC_VERSION,
    ONE_RTT_BUFFER_BYTES,
    release_handshake_state,
)

ALPN = "qpq-test"


def test_the_installed_aioquic_is_the_one_the_release_was_written_for() -> None:
    assert aioquic.__version__ == AIOQUIC_VERSION, (
        "aioquic changed: re-read QuicConnection._crypto_buffers / _spaces / "
        "_push_crypto_data and update qpq_server/transport/handshake_state.py")
    assert aioquic_connection.CRYPTO_BUFFER_SIZE == 16384


class _Server(QuicConnectionProtocol):
    """Echoes each stream; releases the handshake state as qpq's protocol does."""

    freed: list[int]
    before: list[dict[Epoch, int]]

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, HandshakeCompleted):
            quic = self._quic
            assert quic._handshake_complete
            assert quic._spaces[Epoch.INITIAL].discarded
            assert quic._spaces[Epoch.HANDSHAKE].discarded
            _Server.before.append({e: b.capacity for e, b in quic._crypto_buffers.items()})
            _Server.freed.append(release_handshake_state(quic))
        elif isinstance(event, StreamDataReceived) and event.data:
            self._quic.send_stream_data(event.stream_id, event.data, end_stream=event.end_stream)
            self.transmit()


async def _echo(client: QuicConnectionProtocol, data: bytes) -> bytes:
    reader, writer = await client.create_stream()
    writer.write(data)
    writer.write_eof()
    return await asyncio.wait_for(reader.read(), timeout=10)


async def test_release_frees_the_crypto_buffers_and_the_connection_keeps_working(
        tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    write_self_signed(cert, key, "localhost")
    server_config = QuicConfiguration(is_client=False, alpn_protocols=[ALPN])
    server_config.load_cert_chain(str(cert), str(key))
    _Server.freed, _Server.before = [], []
    port = free_port(socket.SOCK_DGRAM)
    server = await serve("127.0.0.1", port, configuration=server_config,
                         create_protocol=_Server)
    try:
        client_config = QuicConfiguration(is_client=True, alpn_protocols=[ALPN],
                                          verify_mode=ssl.CERT_NONE)
        async with connect("127.0.0.1", port, configuration=client_config) as client:
            assert await _echo(client, b"before") == b"before"
            assert _Server.before == [dict.fromkeys(
                (Epoch.INITIAL, Epoch.HANDSHAKE, Epoch.ONE_RTT), 16384)]
            assert _Server.freed == [3 * 16384 - ONE_RTT_BUFFER_BYTES]
            for size in (1, 5000, 200_000):  # streams, flow control and ACKs still work
                payload = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
                assert await _echo(client, payload) == payload
            client.request_key_update()  # a QUIC key update needs no TLS message
            assert await _echo(client, b"after key update") == b"after key update"
    finally:
        server.close()


def test_release_leaves_an_unfinished_handshake_alone(tmp_path: Path) -> None:
    write_self_signed(tmp_path / "cert.pem", tmp_path / "key.pem", "localhost")
    config = QuicConfiguration(is_client=False, alpn_protocols=[ALPN])
    config.load_cert_chain(str(tmp_path / "cert.pem"), str(tmp_path / "key.pem"))
    quic = aioquic_connection.QuicConnection(configuration=config,
                                             original_destination_connection_id=b"8bytes!!")
    assert release_handshake_state(quic) == 0
    assert quic._crypto_buffers == {}  # not even initialised before the first datagram
