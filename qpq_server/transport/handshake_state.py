"""Free what aioquic keeps of a finished handshake for a connection's whole life.

aioquic 1.7.2 gives every connection three 16 KiB CRYPTO staging buffers
(`QuicConnection._crypto_buffers`, one per epoch: INITIAL, HANDSHAKE, ONE_RTT), about
48 KiB of a server connection's ~57 KiB. TLS writes its handshake messages there and
`_push_crypto_data` copies them into the crypto streams at once, so the buffers are
empty between datagrams. Once a server's handshake is complete, aioquic has discarded
the INITIAL and HANDSHAKE epochs (`_confirm_handshake`) and TLS writes nothing more in
them; at ONE_RTT a server writes only a NewSessionTicket, and only when session
tickets are configured (qpq does not). So after `HandshakeCompleted` the buffers are
swapped for small ones. (The torn-down INITIAL key pairs stay: a late client Initial
still looks its version's pair up in `_cryptos_initial`.)

This reaches into aioquic's private attributes: `AIOQUIC_VERSION` is the version they
were read from, tests/server/test_handshake_state.py fails when the installed aioquic
differs or the attributes change, and `release_handshake_state` does nothing (and says
so once) when they are not what it expects.
"""

from __future__ import annotations

import functools
import logging

import aioquic
from aioquic._buffer import Buffer
from aioquic.quic.connection import QuicConnection
from aioquic.tls import Epoch

__all__ = ["AIOQUIC_VERSION", "ONE_RTT_BUFFER_BYTES", "release_handshake_state"]

log = logging.getLogger("qpq.quic")

AIOQUIC_VERSION = "1.7.2"
ONE_RTT_BUFFER_BYTES = 1024
"""Kept at ONE_RTT for any post-handshake TLS message (none is expected); a larger one
would fail the connection with a clear BufferWriteError, not corrupt it."""


@functools.cache
def _warn_unknown_aioquic() -> None:
    log.warning("aioquic %s is not the %s this server was built for: handshake state is "
                "kept (more memory per connection)", aioquic.__version__, AIOQUIC_VERSION)


def release_handshake_state(quic: QuicConnection) -> int:
    """Swap a completed server connection's CRYPTO buffers for small ones; return the
    bytes of buffer capacity freed (0 when there was nothing safe to free)."""
    try:
        buffers: dict[Epoch, Buffer] = quic._crypto_buffers
        spaces = quic._spaces
        done = (quic._handshake_complete and not quic._is_client
                and spaces[Epoch.INITIAL].discarded and spaces[Epoch.HANDSHAKE].discarded)
    except (AttributeError, KeyError):
        _warn_unknown_aioquic()
        return 0
    if not done:
        return 0
    freed = 0
    for epoch, keep in ((Epoch.INITIAL, 0), (Epoch.HANDSHAKE, 0),
                        (Epoch.ONE_RTT, ONE_RTT_BUFFER_BYTES)):
        old = buffers.get(epoch)
        if old is None or old.capacity <= keep or old.tell() != 0:
            continue  # unknown, already small, or (never seen) holding unpushed data
        buffers[epoch] = Buffer(capacity=keep)
        freed += old.capacity - keep
    return freed
