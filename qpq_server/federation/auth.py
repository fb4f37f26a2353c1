"""Peer authentication inside the federation channel.

aioquic (1.x) cannot verify a client certificate on the server side: its TLS code can
send a CertificateRequest only through a private test switch and never checks the
client's chain. So the connecting peer authenticates *inside* the QUIC/TLS channel:
the listener sends a fresh random challenge, and the peer answers with its
CA-signed certificate and an ECDSA signature by that certificate's key over the
challenge, both domains and the ALPN. The listener's own certificate was verified by
the peer in the TLS handshake (CA + domain), so both ends are authenticated; naming
the listener's domain in the signed message stops a peer from replaying a challenge
it was given by one server to another.
"""

from __future__ import annotations

import secrets

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from qpq_server.federation import ALPN

__all__ = ["CHALLENGE_BYTES", "auth_message", "new_challenge", "sign", "signature_valid"]

CHALLENGE_BYTES = 32


def new_challenge() -> bytes:
    return secrets.token_bytes(CHALLENGE_BYTES)


def auth_message(listener_domain: str, peer_domain: str, challenge: bytes) -> bytes:
    return b"\0".join([ALPN.encode(), b"peer-auth", listener_domain.encode(),
                       peer_domain.encode(), challenge])


def sign(key: ec.EllipticCurvePrivateKey, message: bytes) -> bytes:
    return key.sign(message, ec.ECDSA(hashes.SHA256()))


def signature_valid(cert: x509.Certificate, signature: bytes, message: bytes) -> bool:
    public = cert.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey):
        return False
    try:
        public.verify(signature, message, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True
