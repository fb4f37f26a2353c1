"""Multi-device accounts in process (a real Service on a real SQLCipher file): the
server side of adding a device with a link code, per-device delivery and unlinking.
The loopback tests with real client processes are in test_devices.py."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from qpq_server.devices import (
    device_id,
    endorsement_message,
    join_device_set,
    link_keys,
    split_device_set,
)
from qpq_server.kt.sth import parse_kt_leaf
from qpq_server.protocol.dispatch import ConnectionState
from qpq_server.storage.base import Expected, Storage
from tests.helpers.dispatch import Harness, code
from tests.helpers.dispatch import harness as _harness


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[Harness]:
    async for harness in _harness(tmp_path, rate_limit={"enabled": False},
                                  limits={"max_devices": 3}):
        yield harness


def identity(seed: int) -> tuple[bytes, Ed25519PrivateKey]:
    """A 64-byte identity whose Ed25519 half can sign (the X25519 half is filler)."""
    signing = Ed25519PrivateKey.generate()
    return bytes([seed]) * 32 + signing.public_key().public_bytes(
        Encoding.Raw, PublicFormat.Raw), signing


async def link_code_for(h: Harness, conn: ConnectionState, user: str, session: str,
                        approver: bytes, code_text: str = "ABCDEFGHJKMN") -> bytes:
    verifier, _ = link_keys(code_text)
    answer = await h.call(conn, "link_start", session=session, device=device_id(approver),
                          verifier_hash=hashlib.sha256(verifier).digest())
    assert answer["ok"], answer
    return verifier


async def two_devices(h: Harness, user: str) -> tuple[ConnectionState, str, bytes, bytes]:
    conn = await h.connect()
    session = await h.session(conn, user)
    first, _ = identity(1)
    second, _ = identity(2)
    assert (await h.call(conn, "publish_keys", session=session, identity_key=first,
                         key_packages=[b"p-first"]))["ok"]
    verifier = await link_code_for(h, conn, user, session, first)
    added = await h.call(conn, "publish_keys", session=session, identity_key=second,
                         link_code=verifier, key_packages=[b"p-second"])
    assert added["ok"] and added["devices"] == 2, added
    return conn, session, first, second


async def test_a_second_device_needs_a_link_code_and_the_log_lists_both(h: Harness) -> None:
    conn, session, first, second = await two_devices(h, "md_bob")
    leaves = await h.core.service.storage.kt_leaves()
    assert [parse_kt_leaf(leaf.leaf) for leaf in leaves] == [
        ("md_bob", first), ("md_bob", join_device_set([first, second]))]
    listed = await h.call(conn, "devices", session=session, device=device_id(first))
    assert [d["device"] for d in listed["devices"]] == [device_id(first), device_id(second)]
    assert split_device_set(listed["identity_key"]) == sorted([first, second])
    assert listed["kt"]["map_path"] is not None  # the set is the account's current key
    # each device has its own one-time packages, handed out per device
    keys = await h.call(conn, "get_keys", session=session, username="md_bob")
    assert {(d["device"], d["key_package"]) for d in keys["devices"]} == {
        (device_id(first), b"p-first"), (device_id(second), b"p-second")}


async def test_without_a_valid_code_the_new_device_is_refused_and_nothing_changes(
        h: Harness) -> None:
    conn = await h.connect()
    session = await h.session(conn, "nc_bob")
    first, _ = identity(1)
    await h.call(conn, "publish_keys", session=session, identity_key=first, key_packages=[])
    intruder, _ = identity(9)
    refused = await h.call(conn, "publish_keys", session=session, identity_key=intruder,
                           key_packages=[])
    assert code(refused) == "link_required" and "qpq-client link" in refused["error"]["message"]
    await link_code_for(h, conn, "nc_bob", session, first)
    wrong, _ = link_keys("ZZZZZZZZZZZZ")
    for _ in range(5):  # wrong codes use the approval up
        assert code(await h.call(conn, "publish_keys", session=session, identity_key=intruder,
                                 link_code=wrong, key_packages=[])) == "link_required"
    right, _ = link_keys("ABCDEFGHJKMN")
    assert code(await h.call(conn, "publish_keys", session=session, identity_key=intruder,
                             link_code=right, key_packages=[])) == "link_required"
    account = await h.core.service.storage.get_account("nc_bob")
    assert account is not None and account.identity_key == first
    assert len(await h.core.service.storage.kt_leaves()) == 1


async def test_a_session_alone_cannot_add_link_or_unlink(h: Harness) -> None:
    _conn, session, first, second = await two_devices(h, "so_bob")
    thief = await h.connect()  # holds the session token, not the password
    third, _ = identity(3)
    assert code(await h.call(thief, "publish_keys", session=session, identity_key=third,
                             key_packages=[])) == "proof_required"
    assert code(await h.call(thief, "link_start", session=session, device=device_id(first),
                             verifier_hash=b"\0" * 32)) == "unauthenticated"
    assert code(await h.call(thief, "unlink", session=session, device=device_id(first),
                             target=device_id(second))) == "unauthenticated"
    account = await h.core.service.storage.get_account("so_bob")
    assert account is not None and len(split_device_set(account.identity_key or b"")) == 2


async def test_devices_per_account_are_bounded(h: Harness) -> None:
    conn, session, first, _ = await two_devices(h, "bd_bob")
    verifier = await link_code_for(h, conn, "bd_bob", session, first)
    third, _ = identity(3)
    assert (await h.call(conn, "publish_keys", session=session, identity_key=third,
                         link_code=verifier, key_packages=[]))["ok"]
    over = await h.call(conn, "link_start", session=session, device=device_id(first),
                        verifier_hash=b"\0" * 32)
    assert code(over) == "too_many_devices" and "unlink one" in over["error"]["message"]


async def test_each_device_fetches_and_acks_its_own_copy(h: Harness) -> None:
    conn, bob, first, second = await two_devices(h, "pd_bob")
    alice = await h.session(conn, "pd_alice")
    sent = await h.call(conn, "enqueue", session=alice, recipients=["pd_bob"], payload=b"ct")
    assert len(sent["ids"]) == 2  # one copy per device
    one = await h.call(conn, "fetch", session=bob, device=device_id(first))
    two = await h.call(conn, "fetch", session=bob, device=device_id(second))
    assert [m["payload"] for m in one["messages"]] == [m["payload"] for m in two["messages"]]
    assert (await h.call(conn, "ack", session=bob, device=device_id(first),
                         ids=[one["messages"][0]["id"], two["messages"][0]["id"]]))[
        "deleted"] == 1  # the other device's copy is not this device's to delete
    again = await h.call(conn, "fetch", session=bob, device=device_id(second))
    assert [m["payload"] for m in again["messages"]] == [b"ct"]
    # the sender's own other devices get a copy of what it sends, the sending one not
    mine = await h.call(conn, "enqueue", session=bob, recipients=["pd_alice", "pd_bob"],
                        payload=b"note", device=device_id(first))
    assert len(mine["ids"]) == 2
    assert (await h.call(conn, "fetch", session=bob, device=device_id(first)))[
        "messages"] == []


async def test_unlink_is_logged_stops_delivery_and_ends_sessions(h: Harness) -> None:
    conn, bob, first, second = await two_devices(h, "ul_bob")
    alice = await h.session(conn, "ul_alice")
    await h.call(conn, "enqueue", session=alice, recipients=["ul_bob"], payload=b"before")
    h.clock.now += 1  # sessions issued before the unlink end with it
    gone = await h.call(conn, "unlink", session=bob, device=device_id(first),
                        target=device_id(second))
    assert gone["ok"] and gone["devices"] == 1, gone
    account = await h.core.service.storage.get_account("ul_bob")
    assert account is not None and account.identity_key == first
    assert parse_kt_leaf((await h.core.service.storage.kt_leaves())[-1].leaf) == ("ul_bob", first)
    assert code(await h.call(conn, "fetch", session=bob)) == "invalid_session"
    fresh = gone["session"]
    assert code(await h.call(conn, "fetch", session=fresh, device=device_id(second))) == \
        "device_unlinked"
    sent = await h.call(conn, "enqueue", session=alice, recipients=["ul_bob"], payload=b"x")
    assert len(sent["ids"]) == 1
    keys = await h.call(conn, "get_keys", session=alice, username="ul_bob")
    assert [d["device"] for d in keys["devices"]] == [device_id(first)]
    last = await h.login(conn, "ul_bob")  # account-wide sessions ended, this one is new
    assert last["ok"]
    only = await h.call(conn, "unlink", session=last["session"], device=device_id(first),
                        target=device_id(first))
    assert code(only) == "bad_request" and "only device" in only["error"]["message"]


async def test_endorsements_must_be_signed_by_the_endorsing_device(h: Harness) -> None:
    conn = await h.connect()
    session = await h.session(conn, "en_bob")
    first, first_key = identity(1)
    second, _ = identity(2)
    await h.call(conn, "publish_keys", session=session, identity_key=first, key_packages=[])
    verifier = await link_code_for(h, conn, "en_bob", session, first)
    await h.call(conn, "publish_keys", session=session, identity_key=second,
                 link_code=verifier, key_packages=[])
    forged = await h.call(conn, "device_endorse", session=session, device=device_id(first),
                          target=device_id(second), signature=b"\1" * 64)
    assert code(forged) == "bad_request"
    good = first_key.sign(endorsement_message("en_bob", first, second))
    assert (await h.call(conn, "device_endorse", session=session, device=device_id(first),
                         target=device_id(second), signature=good))["ok"]
    listed = await h.call(conn, "devices", session=session)
    assert listed["devices"][1]["endorsements"] == {device_id(first): good}


async def test_a_single_device_account_from_before_devices_keeps_working(
        h: Harness) -> None:
    """No device record, one logged identity, untagged state: read as one device whose
    mailbox is the account name (every backend: the records live in storage meta)."""
    conn = await h.connect()
    alice = await h.session(conn, "lg_alice")
    bob = await h.session(conn, "lg_bob")
    old, _ = identity(5)
    await h.core.service.storage.set_identity_key("lg_bob", old)  # as an old server left it
    await h.core.service.storage.enqueue("lg_alice", ["lg_bob"], b"queued before", 1.0)
    await h.core.service.storage.set_meta("spk:lg_bob", (b"s" * 32 + b"g" * 64).hex())
    keys = await h.call(conn, "get_keys", session=alice, username="lg_bob")
    assert keys["identity_key"] == old and keys["signed_prekey"] == b"s" * 32
    assert [d["device"] for d in keys["devices"]] == [device_id(old)]
    # an old client (no 'device' field) still reads its queue
    fetched = await h.call(conn, "fetch", session=bob)
    assert [m["payload"] for m in fetched["messages"]] == [b"queued before"]
    assert (await h.call(conn, "fetch", session=bob, device=device_id(old)))[
        "messages"] == fetched["messages"]
    assert await h.core.service.storage.get_meta("devices:lg_bob") is None
    # its one-time packages from before devices are still handed out, tagged as its own
    await h.core.service.storage.add_key_packages("lg_bob", [b"o" * 32])
    published = await h.call(conn, "publish_keys", session=bob, key_packages=[])
    assert published["ok"] and published["key_packages"] == 1, published
    keys = await h.call(conn, "get_keys", session=alice, username="lg_bob")
    assert keys["devices"][0]["key_package"] == b"o" * 32
    assert device_id(old) in json.loads(
        await h.core.service.storage.get_meta("devices:lg_bob") or "{}")


async def test_a_device_session_acts_for_its_device_alone_and_ends_with_it(
        h: Harness) -> None:
    conn, _bob, first, second = await two_devices(h, "bs_bob")
    one = (await h.login(conn, "bs_bob", device=device_id(first)))["session"]
    two = (await h.login(conn, "bs_bob", device=device_id(second)))["session"]
    alice = await h.session(conn, "bs_alice")
    await h.call(conn, "enqueue", session=alice, recipients=["bs_bob"], payload=b"m")
    # no 'device' needed: the session says which; naming another device is refused
    assert [m["payload"] for m in (await h.call(conn, "fetch", session=two))["messages"]] \
        == [b"m"]
    other = await h.call(conn, "ack", session=two, device=device_id(first), ids=[1])
    assert code(other) == "unauthenticated" and device_id(second) in other["error"]["message"]
    h.clock.now += 1
    gone = await h.call(conn, "unlink", session=one, target=device_id(second))
    assert gone["ok"], gone
    assert code(await h.call(conn, "fetch", session=two)) == "invalid_session"
    assert (await h.call(conn, "fetch", session=one))["ok"]  # the remaining device's lives
    bad = await h.login(conn, "bs_bob", device="not-hex")
    assert code(bad) == "bad_request"


class OtherNodeLinksMeanwhile:
    """The real storage, with another process changing the device set the moment this
    one has read it (what two workers or PostgreSQL nodes can do)."""

    def __init__(self, storage: Storage) -> None:
        self._storage = storage
        self.strike: bytes | None = None

    def __getattr__(self, name: str) -> object:
        return getattr(self._storage, name)

    async def get_meta(self, key: str) -> str | None:
        if key.startswith("link:") and self.strike is not None:
            user, self.strike = key[len("link:"):], None
            await self._storage.set_identity_key(user, b"\x42" * 64)
        return await self._storage.get_meta(key)


async def test_a_device_set_changed_by_another_process_meanwhile_is_not_overwritten(
        tmp_path: Path) -> None:
    wrapped: list[OtherNodeLinksMeanwhile] = []

    def wrap(storage: Storage) -> Storage:
        wrapped.append(OtherNodeLinksMeanwhile(storage))
        return cast(Storage, wrapped[0])

    async for h in _harness(tmp_path, wrap, rate_limit={"enabled": False}):
        conn = await h.connect()
        session = await h.session(conn, "race_bob")
        first, _ = identity(1)
        await h.call(conn, "publish_keys", session=session, identity_key=first,
                     key_packages=[])
        verifier = await link_code_for(h, conn, "race_bob", session, first)
        wrapped[0].strike = b"go"
        second, _ = identity(2)
        raced = await h.call(conn, "publish_keys", session=session, identity_key=second,
                             link_code=verifier, key_packages=[])
        assert code(raced) == "server_busy" and "retry" in raced["error"]["message"]
        account = await h.core.service.storage.get_account("race_bob")
        assert account is not None and account.identity_key == b"\x42" * 64


class OtherNodeLinksAtTheLastMoment(OtherNodeLinksMeanwhile):
    """Another process changes the device set after this one's last read, just before
    its write: only a compare-and-set in storage catches that."""

    async def get_meta(self, key: str) -> str | None:
        return await self._storage.get_meta(key)

    async def publish_identity_key(self, username: str, identity_key: bytes, kt_leaf: bytes,
                                   now: float, expected: Expected | None = None) -> int:
        if self.strike is not None:
            self.strike = None
            await self._storage.set_identity_key(username, b"\x43" * 64)
        return await self._storage.publish_identity_key(username, identity_key, kt_leaf, now,
                                                        expected=expected)


async def test_two_concurrent_device_set_changes_never_overwrite_each_other(
        tmp_path: Path) -> None:
    wrapped: list[OtherNodeLinksAtTheLastMoment] = []

    def wrap(storage: Storage) -> Storage:
        wrapped.append(OtherNodeLinksAtTheLastMoment(storage))
        return cast(Storage, wrapped[0])

    async for h in _harness(tmp_path, wrap, rate_limit={"enabled": False}):
        conn = await h.connect()
        session = await h.session(conn, "race_carol")
        first, _ = identity(1)
        await h.call(conn, "publish_keys", session=session, identity_key=first,
                     key_packages=[])
        verifier = await link_code_for(h, conn, "race_carol", session, first)
        wrapped[0].strike = b"go"
        second, _ = identity(2)
        raced = await h.call(conn, "publish_keys", session=session, identity_key=second,
                             link_code=verifier, key_packages=[])
        assert code(raced) == "server_busy" and "retry" in raced["error"]["message"]
        account = await h.core.service.storage.get_account("race_carol")
        assert account is not None and account.identity_key == b"\x43" * 64
        leaves = await h.core.service.storage.kt_leaves()
        assert [leaf.username for leaf in leaves].count("race_carol") == 1  # not logged
