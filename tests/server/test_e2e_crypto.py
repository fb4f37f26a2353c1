"""End-to-end sealing, without sockets: who can and cannot open an envelope."""

from __future__ import annotations

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from qpq_server.client.e2e import DecryptError, RecipientKey, open_envelope, public_bytes, seal


def keyring(*keys: X25519PrivateKey):  # type: ignore[no-untyped-def]
    by_public = {public_bytes(k): k for k in keys}
    return by_public.get


def test_round_trip_with_one_time_key_and_with_identity_only() -> None:
    ik, opk = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    with_opk = seal({"text": "hi"}, "alice",
                    [RecipientKey("bob", public_bytes(ik), public_bytes(opk))])
    sender, used, content = open_envelope(with_opk, "bob", keyring(ik, opk))
    assert (sender, used, content) == ("alice", public_bytes(opk), {"text": "hi"})
    identity_only = seal({"text": "hi"}, "alice", [RecipientKey("bob", public_bytes(ik))])
    assert open_envelope(identity_only, "bob", keyring(ik))[2] == {"text": "hi"}


def test_a_substituted_key_package_gives_the_server_nothing() -> None:
    """The server hands out its own 'one-time key' for bob: it holds that private key,
    but the wrap also needs bob's identity key, which the KT log pins."""
    bob_ik = X25519PrivateKey.generate()
    server_opk = X25519PrivateKey.generate()
    envelope = seal({"text": "secret"}, "alice",
                    [RecipientKey("bob", public_bytes(bob_ik), public_bytes(server_opk))])
    attacker_ik = X25519PrivateKey.generate()
    forged = msgpack.unpackb(envelope, raw=False)
    forged["k"]["bob"]["ik"] = public_bytes(attacker_ik)  # pretend the wrap used its key
    with pytest.raises(DecryptError):
        open_envelope(msgpack.packb(forged, use_bin_type=True), "bob",
                      keyring(attacker_ik, server_opk))
    with pytest.raises(DecryptError):  # without bob's identity key: nothing to open with
        open_envelope(envelope, "bob", keyring(server_opk))


def test_tampered_or_misaddressed_envelopes_are_refused() -> None:
    ik = X25519PrivateKey.generate()
    envelope = seal({"text": "hi"}, "alice", [RecipientKey("bob", public_bytes(ik))])
    data = msgpack.unpackb(envelope, raw=False)
    data["ct"] = bytes([data["ct"][0] ^ 1]) + data["ct"][1:]
    with pytest.raises(DecryptError):
        open_envelope(msgpack.packb(data, use_bin_type=True), "bob", keyring(ik))
    data = msgpack.unpackb(envelope, raw=False)
    data["from"] = "mallory"  # the sender's name is bound as associated data
    with pytest.raises(DecryptError):
        open_envelope(msgpack.packb(data, use_bin_type=True), "bob", keyring(ik))
    with pytest.raises(DecryptError):
        open_envelope(envelope, "carol", keyring(ik))
    with pytest.raises(DecryptError):
        open_envelope(b"\x00garbage", "bob", keyring(ik))
