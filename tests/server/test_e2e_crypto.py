"""End-to-end sealing, without sockets: who can and cannot open an envelope, and who
can and cannot pass one off as someone else's."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from qpq_server.client import e2e
from qpq_server.client.contacts import ContactPins, fingerprint_digits, safety_number
from qpq_server.client.e2e import (
    DecryptError,
    ForgedSender,
    RecipientKey,
    open_envelope,
    parse_envelope,
    public_bytes,
    seal,
)
from qpq_server.client.errors import IdentityChanged
from qpq_server.client.profile import Profile
from qpq_server.identity import (
    identity_change_message,
    signed_prekey_message,
    split_identity,
    verify_signature,
)

NOW_MS = int(time.time() * 1000)


def person(tmp_path: Path, name: str) -> Profile:
    return Profile.load_or_create(tmp_path, name)


def to(p: Profile, one_time: bool = False) -> RecipientKey:
    opk = p.new_one_time_keys(1)[0] if one_time else None
    return RecipientKey(p.username, p.identity_public, p.current_prekey(time.time())[0], opk)


def open_as(p: Profile, envelope: bytes,
            sender_identity: bytes) -> tuple[str, bytes, dict[str, Any]]:
    env = parse_envelope(envelope, p.username)
    used, content = open_envelope(env, p.username, p.identity_public, p.private_key_for,
                                  sender_identity)
    return env.sender, used, content


def test_round_trip_with_one_time_key_and_with_signed_prekey_only(tmp_path: Path) -> None:
    alice, bob = person(tmp_path, "alice"), person(tmp_path, "bob")
    recipient = to(bob, one_time=True)
    envelope = seal({"text": "hi"}, "alice", alice.identity, alice.identity_public,
                    [recipient], NOW_MS)
    sender, used, content = open_as(bob, envelope, alice.identity_public)
    assert (sender, used, content) == ("alice", recipient.one_time_key, {"text": "hi"})
    prekey_only = seal({"text": "hi"}, "alice", alice.identity, alice.identity_public,
                       [to(bob)], NOW_MS)
    assert open_as(bob, prekey_only, alice.identity_public)[2] == {"text": "hi"}


def test_a_forger_without_the_senders_identity_key_is_refused(tmp_path: Path) -> None:
    alice, bob = person(tmp_path, "alice"), person(tmp_path, "bob")
    mallory = X25519PrivateKey.generate()
    # naming alice's identity without her private key: DH1 differs, the wrap fails
    claimed = seal({"text": "pay"}, "alice", mallory, alice.identity_public, [to(bob)],
                   NOW_MS)
    with pytest.raises(ForgedSender):
        open_as(bob, claimed, alice.identity_public)
    # naming its own identity: refused before any decryption
    own = seal({"text": "pay"}, "alice", mallory,
               public_bytes(mallory) + alice.identity_public[32:], [to(bob)], NOW_MS)
    with pytest.raises(ForgedSender):
        open_as(bob, own, alice.identity_public)


def test_a_co_recipient_cannot_swap_the_body_under_anothers_wrap(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """bob knows the content key of a group message; with it he must not be able to
    make carol read something else 'from alice' (each wrap binds the body's hash)."""
    alice, bob, carol = (person(tmp_path, n) for n in ("alice", "bob", "carol"))
    content_key = ChaCha20Poly1305.generate_key()

    class KnownKey:  # what bob learns by opening his own wrap
        generate_key = staticmethod(lambda: content_key)

        def __new__(cls, key: bytes) -> ChaCha20Poly1305:  # type: ignore[misc]
            return ChaCha20Poly1305(key)

    monkeypatch.setattr(e2e, "ChaCha20Poly1305", KnownKey)
    envelope = seal({"text": "lunch?"}, "alice", alice.identity, alice.identity_public,
                    [to(bob), to(carol)], NOW_MS)
    monkeypatch.undo()
    assert open_as(carol, envelope, alice.identity_public)[2] == {"text": "lunch?"}
    data = msgpack.unpackb(envelope, raw=False)
    data["ct"] = ChaCha20Poly1305(content_key).encrypt(
        data["n"], msgpack.packb({"text": "fire everyone"}), b"qpq/3 body|" + data["h"])
    with pytest.raises(ForgedSender):
        open_as(carol, msgpack.packb(data, use_bin_type=True), alice.identity_public)


def test_a_substituted_one_time_key_gives_the_server_nothing(tmp_path: Path) -> None:
    """The server hands out its own 'one-time key' for bob: it holds that private key,
    but the wrap also needs bob's identity and signed prekey."""
    alice, bob = person(tmp_path, "alice"), person(tmp_path, "bob")
    server_opk = X25519PrivateKey.generate()
    recipient = RecipientKey("bob", bob.identity_public, bob.current_prekey(time.time())[0],
                             public_bytes(server_opk))
    envelope = seal({"text": "secret"}, "alice", alice.identity, alice.identity_public,
                    [recipient], NOW_MS)
    by_public = {public_bytes(server_opk): server_opk}
    env = parse_envelope(envelope, "bob")
    with pytest.raises(DecryptError):
        open_envelope(env, "bob", bob.identity_public, by_public.get, alice.identity_public)


def test_tampered_or_misaddressed_envelopes_are_refused(tmp_path: Path) -> None:
    alice, bob = person(tmp_path, "alice"), person(tmp_path, "bob")
    envelope = seal({"text": "hi"}, "alice", alice.identity, alice.identity_public,
                    [to(bob)], NOW_MS)
    data = msgpack.unpackb(envelope, raw=False)
    data["ct"] = bytes([data["ct"][0] ^ 1]) + data["ct"][1:]
    with pytest.raises(DecryptError):
        open_as(bob, msgpack.packb(data, use_bin_type=True), alice.identity_public)
    data = msgpack.unpackb(envelope, raw=False)
    data["h"] = msgpack.packb([3, "mallory", alice.identity_public, NOW_MS])
    with pytest.raises(DecryptError):  # the header (sender name) is authenticated
        open_as(bob, msgpack.packb(data, use_bin_type=True), alice.identity_public)
    with pytest.raises(DecryptError):
        parse_envelope(envelope, "carol")
    for garbage in (b"\x00garbage", msgpack.packb({"v": 2}), msgpack.packb([1, 2])):
        with pytest.raises(DecryptError):
            parse_envelope(garbage, "bob")


def test_signed_prekey_and_identity_handover_signatures(tmp_path: Path) -> None:
    bob = person(tmp_path, "bob")
    prekey, signature = bob.current_prekey(time.time())
    assert verify_signature(bob.identity_public, signature,
                            signed_prekey_message(bob.identity_public, prekey))
    other = person(tmp_path, "other")
    assert not verify_signature(other.identity_public, signature,
                                signed_prekey_message(other.identity_public, prekey))
    assert not verify_signature(bob.identity_public, signature,
                                signed_prekey_message(bob.identity_public, bytes(32)))
    # a prekey signature can never pass as an identity handover (distinct contexts)
    handover = identity_change_message("bob", bob.identity_public, other.identity_public)
    assert not verify_signature(bob.identity_public, signature, handover)
    assert verify_signature(bob.identity_public, bob.sign(handover), handover)
    with pytest.raises(ValueError):
        split_identity(b"short")
    # rotation: a week later a new prekey, and the old one still opens old mail
    later = bob.current_prekey(time.time() + 8 * 86400)[0]
    assert later != prekey and bob.private_key_for(prekey) is not None


def test_safety_number_is_the_same_on_both_sides_and_changes_with_a_key(
        tmp_path: Path) -> None:
    alice, bob = person(tmp_path, "alice"), person(tmp_path, "bob")
    a = safety_number("alice", alice.identity_public, "bob", bob.identity_public)
    b = safety_number("bob", bob.identity_public, "alice", alice.identity_public)
    assert a == b and len(a.split()) == 12 and all(len(g) == 5 for g in a.split())
    new_bob = person(tmp_path, "bob2")
    assert safety_number("alice", alice.identity_public, "bob", new_bob.identity_public) != a
    # the documented construction (Signal numeric fingerprint v0), recomputed with hashlib
    h = hashlib.sha512(b"\x00\x00" + bob.identity_public + b"bob").digest()
    for _ in range(5200):
        h = hashlib.sha512(h + bob.identity_public).digest()
    expected = "".join(f"{int.from_bytes(h[i:i + 5], 'big') % 100000:05d}"
                       for i in range(0, 30, 5))
    assert fingerprint_digits("bob", bob.identity_public) == expected


def test_pins_are_trust_on_first_use_then_strict(tmp_path: Path) -> None:
    pins = ContactPins(tmp_path, "127.0.0.1:7000")
    assert pins.check("bob", b"\x01" * 64) is True
    assert pins.check("bob", b"\x01" * 64) is False
    with pytest.raises(IdentityChanged) as err:
        pins.check("bob", b"\x02" * 64)
    assert "qpq-client trust bob" in err.value.message and "SECURITY" in err.value.message
    pins.pin("bob", b"\x02" * 64)
    assert pins.check("bob", b"\x02" * 64) is False
    assert oct(pins.path.stat().st_mode & 0o777) == "0o600"


def test_replay_cache_persists_and_forgets_after_the_window(tmp_path: Path) -> None:
    bob = person(tmp_path, "bob")
    now = time.time()
    bob.remember(b"old", now - 100 * 86400)
    bob.remember(b"new", now)
    bob.save()
    again = Profile.load_or_create(tmp_path, "bob")
    assert set(again.seen) == {b"new"}
    assert again.identity_public == bob.identity_public
