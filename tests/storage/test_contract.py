"""One behaviour contract for every storage backend (parametrized: sqlcipher, file,
postgres on a real PostgreSQL started for the session)."""

from __future__ import annotations

import asyncio

import pytest

from qpq_server.errors import UserExists
from qpq_server.storage.base import Storage
from tests.storage.conftest import StorageFactory


async def make_users(storage: Storage, *names: str) -> None:
    for name in names:
        await storage.create_account(name, b"pf-" + name.encode(), 1, 1000.0)


async def test_account_is_created_read_and_updated(storage: Storage) -> None:
    assert await storage.get_account("alice") is None
    await storage.create_account("alice", b"record", 1, 1234.5)
    account = await storage.get_account("alice")
    assert account is not None
    assert (account.username, account.password_file, account.setup_version,
            account.identity_key, account.created_at) == ("alice", b"record", 1, None, 1234.5)
    await storage.update_password_file("alice", b"record2", 2)
    await storage.set_identity_key("alice", b"k" * 32)
    account = await storage.get_account("alice")
    assert account is not None
    assert (account.password_file, account.setup_version, account.identity_key) == (
        b"record2", 2, b"k" * 32)


async def test_account_with_meta_reads_both_whichever_exists(storage: Storage) -> None:
    assert await storage.account_with_meta("alice", "devices:alice") == (None, None)
    await storage.set_meta("devices:alice", "{}")
    assert await storage.account_with_meta("alice", "devices:alice") == (None, "{}")
    await storage.create_account("alice", b"record", 1, 1234.5)
    await storage.set_identity_key("alice", b"k" * 32)
    account, value = await storage.account_with_meta("alice", "devices:bob")
    assert value is None and account == await storage.get_account("alice")
    assert account is not None and account.identity_key == b"k" * 32
    assert await storage.account_with_meta("alice", "devices:alice") == (account, "{}")


async def test_taken_username_is_refused_and_first_account_kept(storage: Storage) -> None:
    await storage.create_account("bob", b"first", 1, 1.0)
    with pytest.raises(UserExists):
        await storage.create_account("bob", b"second", 1, 2.0)
    account = await storage.get_account("bob")
    assert account is not None and account.password_file == b"first"


async def test_dot_usernames_are_ordinary_names(storage: Storage) -> None:
    await make_users(storage, ".", "..", "a.b")
    assert await storage.existing_users([".", "..", "a.b", "nobody"]) == {".", "..", "a.b"}
    await storage.enqueue("..", ["."], b"dots", 1.0)
    assert [m.payload for m in await storage.fetch(".", 10)] == [b"dots"]
    assert await storage.fetch("..", 10) == []


async def test_existing_users_reports_only_known_names(storage: Storage) -> None:
    await make_users(storage, "u1", "u2")
    assert await storage.existing_users(["u1", "u2", "u3", "u1"]) == {"u1", "u2"}
    assert await storage.existing_users([]) == set()


async def test_key_packages_are_handed_out_once_oldest_first(storage: Storage) -> None:
    await make_users(storage, "kp")
    assert await storage.count_key_packages("kp") == 0
    assert await storage.add_key_packages("kp", [b"p1", b"p2"]) == 2
    assert await storage.add_key_packages("kp", [b"p3"]) == 3
    taken = [await storage.take_key_package("kp") for _ in range(4)]
    assert [t.key_package if t else None for t in taken] == [b"p1", b"p2", b"p3", None]
    ids = [t.id for t in taken if t]
    assert ids == sorted(ids) and len(set(ids)) == 3
    assert await storage.count_key_packages("kp") == 0


async def test_key_packages_are_taken_and_counted_per_device_tag(storage: Storage) -> None:
    """Each device's one-time packages carry its 8-byte tag: taking one for a device
    never hands out another device's package (multi-device accounts)."""
    await make_users(storage, "md")
    one, two = b"\x01" * 8, b"\x02" * 8
    await storage.add_key_packages("md", [one + b"a", two + b"b", one + b"c"])
    assert await storage.count_key_packages("md", one) == 2
    assert await storage.count_key_packages("md", two) == 1
    assert await storage.count_key_packages("md") == 3
    taken = await storage.take_key_package("md", two)
    assert taken is not None and taken.key_package == two + b"b"
    assert await storage.take_key_package("md", two) is None
    assert [p.key_package for p in [await storage.take_key_package("md", one)] if p] == [
        one + b"a"]
    assert await storage.count_key_packages("md", one) == 1


async def test_concurrent_takes_never_share_a_key_package(storage: Storage) -> None:
    await make_users(storage, "hot")
    await storage.add_key_packages("hot", [bytes([i]) * 8 for i in range(10)])
    results = await asyncio.gather(*(storage.take_key_package("hot") for _ in range(25)))
    packages = [r.key_package for r in results if r is not None]
    assert len(packages) == 10 and len(set(packages)) == 10


async def test_messages_are_queued_per_recipient_in_order(storage: Storage) -> None:
    await make_users(storage, "s", "r1", "r2")
    first = await storage.enqueue("s", ["r1", "r2"], b"hello", 10.0)
    assert len(first) == 2 and len(set(first)) == 2
    for i in range(5):
        await storage.enqueue("s", ["r1"], b"m%d" % i, 11.0 + i)
    assert await storage.queue_depth() == 7
    got = await storage.fetch("r1", 100)
    assert [m.payload for m in got] == [b"hello", b"m0", b"m1", b"m2", b"m3", b"m4"]
    assert all(m.recipient == "r1" and m.sender == "s" for m in got)
    assert [m.sent_at for m in got] == [10.0, 11.0, 12.0, 13.0, 14.0, 15.0]
    assert [m.id for m in got] == sorted(m.id for m in got)
    assert [m.payload for m in await storage.fetch("r1", 2)] == [b"hello", b"m0"]
    assert [m.payload for m in await storage.fetch("r2", 100)] == [b"hello"]


async def test_ack_deletes_only_the_recipients_own_messages(storage: Storage) -> None:
    await make_users(storage, "s", "r1", "r2")
    (id1,) = await storage.enqueue("s", ["r1"], b"for r1", 1.0)
    (id2,) = await storage.enqueue("s", ["r2"], b"for r2", 1.0)
    assert await storage.ack("r1", [id2]) == 0  # not r1's message
    assert await storage.ack("r1", [id1, id1, 999_999]) == 1
    assert await storage.ack("r1", []) == 0
    assert await storage.fetch("r1", 10) == []
    assert [m.id for m in await storage.fetch("r2", 10)] == [id2]
    assert await storage.queue_depth() == 1


async def test_concurrent_enqueues_all_land_with_distinct_ids(storage: Storage) -> None:
    await make_users(storage, "s", "r")
    batches = await asyncio.gather(*(storage.enqueue("s", ["r"], b"x%d" % i, 1.0)
                                     for i in range(40)))
    ids = [i for batch in batches for i in batch]
    assert len(set(ids)) == 40
    assert len(await storage.fetch("r", 100)) == 40


async def test_meta_values_are_set_and_overwritten(storage: Storage) -> None:
    assert await storage.get_meta("restore_state") is None
    await storage.set_meta("restore_state", "pending")
    await storage.set_meta("restore_state", "done")
    await storage.set_meta("other", "1")
    assert await storage.get_meta("restore_state") == "done"
    assert await storage.get_meta("other") == "1"


async def test_identity_publication_appends_consecutive_kt_leaves(storage: Storage) -> None:
    await make_users(storage, "a", "b")
    assert await storage.kt_leaves() == []
    assert await storage.publish_identity_key("a", b"A" * 32, b"leaf-a1", 5.0) == 0
    assert await storage.publish_identity_key("b", b"B" * 32, b"leaf-b1", 6.0) == 1
    assert await storage.publish_identity_key("a", b"C" * 32, b"leaf-a2", 7.0) == 2
    leaves = await storage.kt_leaves()
    assert [(x.index, x.username, x.leaf, x.created_at) for x in leaves] == [
        (0, "a", b"leaf-a1", 5.0), (1, "b", b"leaf-b1", 6.0), (2, "a", b"leaf-a2", 7.0)]
    assert [x.index for x in await storage.kt_leaves(start=2)] == [2]
    account = await storage.get_account("a")
    assert account is not None and account.identity_key == b"C" * 32


async def test_everything_survives_a_reopen_and_ids_do_not_repeat(
        storage_factory: StorageFactory) -> None:
    s = storage_factory()
    await s.open()
    await make_users(s, "s", "r")
    await s.add_key_packages("r", [b"kp1", b"kp2"])
    (before,) = await s.enqueue("s", ["r"], b"kept", 1.0)
    (acked,) = await s.enqueue("s", ["r"], b"gone", 2.0)
    assert await s.ack("r", [acked]) == 1
    await s.publish_identity_key("r", b"R" * 32, b"leaf", 3.0)
    await s.set_meta("k", "v")
    await s.close()

    s = storage_factory()
    await s.open()
    try:
        assert await s.existing_users(["s", "r"]) == {"s", "r"}
        assert [m.payload for m in await s.fetch("r", 10)] == [b"kept"]
        assert await s.queue_depth() == 1
        assert await s.count_key_packages("r") == 2
        assert [x.leaf for x in await s.kt_leaves()] == [b"leaf"]
        assert await s.get_meta("k") == "v"
        (after,) = await s.enqueue("s", ["r"], b"new", 4.0)
        assert after > max(before, acked)
        assert await s.publish_identity_key("s", b"S" * 32, b"leaf2", 5.0) == 1
    finally:
        await s.close()


async def test_fetch_bounded_by_bytes_always_returns_the_first(storage: Storage) -> None:
    await make_users(storage, "s", "r")
    for size in (10, 20, 30, 40):
        await storage.enqueue("s", ["r"], b"x" * size, 1.0)
    sizes = [len(m.payload) for m in await storage.fetch("r", 10, max_bytes=30)]
    assert sizes == [10, 20]
    assert [len(m.payload) for m in await storage.fetch("r", 10, max_bytes=5)] == [10]
    assert [len(m.payload) for m in await storage.fetch("r", 3, max_bytes=10_000)] == [
        10, 20, 30]
    assert [len(m.payload) for m in await storage.fetch("r", 10, max_bytes=None)] == [
        10, 20, 30, 40]
    assert await storage.fetch("nobody", 10, max_bytes=100) == []


async def test_a_page_larger_than_an_inline_read_is_returned_whole(storage: Storage) -> None:
    # SQLCipher reads small pages on the event loop and redoes larger ones in its pool
    # (storage/sqlcipher.py `_INLINE_READ_BYTES`, 256 KiB): both paths give the same page.
    await make_users(storage, "s", "r")
    for i in range(6):
        await storage.enqueue("s", ["r"], bytes([i]) * 100_000, 1.0)
    page = await storage.fetch("r", 10, max_bytes=450_000)
    assert [m.payload[0] for m in page] == [0, 1, 2, 3]
    assert [m.payload[0] for m in await storage.fetch("r", 2, max_bytes=None)] == [0, 1]
    assert len(await storage.fetch("r", 10, max_bytes=None)) == 6


async def test_mailbox_bytes_sums_waiting_payloads(storage: Storage, backend: str) -> None:
    await make_users(storage, "s", "r1", "r2")
    await storage.enqueue("s", ["r1", "r2"], b"abc" * 100, 1.0)
    (gone,) = await storage.enqueue("s", ["r1"], b"defgh" * 100, 1.0)
    before = await storage.mailbox_bytes(["r1", "r2", "r1"])
    # The SQL backends count payload bytes exactly; the file backend counts file sizes
    # (payload plus a small header per message).
    slack = 0 if backend != "file" else 128
    assert set(before) == {"r1", "r2"}
    assert 800 <= before["r1"] <= 800 + 2 * slack and 300 <= before["r2"] <= 300 + slack
    await storage.ack("r1", [gone])
    after = await storage.mailbox_bytes(["r1", "nobody"])
    assert 300 <= after["r1"] <= 300 + slack and after.get("nobody", 0) == 0
    assert await storage.mailbox_bytes([]) == {}


async def test_meta_with_prefix_returns_only_matching_keys(storage: Storage) -> None:
    for key, value in (("epoch:alice", "1"), ("epoch:bob", "2"), ("epoch", "x"),
                       ("epocha", "y"), ("other", "z"), ("epoch:_%", "3")):
        await storage.set_meta(key, value)
    assert await storage.meta_with_prefix("epoch:") == {
        "epoch:alice": "1", "epoch:bob": "2", "epoch:_%": "3"}
    assert await storage.meta_with_prefix("nothing") == {}


async def test_one_message_to_many_recipients_returns_ids_in_recipient_order(
        storage: Storage) -> None:
    names = [f"r{i:02d}" for i in range(20)]
    await make_users(storage, "s", *names)
    ids = await storage.enqueue("s", names[::-1], b"fan-out", 1.0)
    assert len(set(ids)) == 20
    for name, message_id in zip(names[::-1], ids, strict=True):
        assert [m.id for m in await storage.fetch(name, 10)] == [message_id]


async def test_a_relayed_message_is_stored_once_per_origin_and_relay_id(
        storage: Storage) -> None:
    await make_users(storage, "bob")

    async def relay(origin: str, relay_id: int, sender: str, payload: bytes,
                    now: float) -> list[int] | None:
        return await storage.enqueue_relayed(origin, relay_id, sender, ["bob"], payload, now)

    first = await relay("a.example", 7, "alice@a.example", b"m", 1.0)
    again = await relay("a.example", 7, "alice@a.example", b"m", 2.0)
    other = await relay("c.example", 7, "carol@c.example", b"n", 3.0)
    assert first is not None and len(first) == 1 and again is None and other is not None
    got = await storage.fetch("bob", 10)
    assert [(m.sender, m.payload) for m in got] == [("alice@a.example", b"m"),
                                                   ("carol@c.example", b"n")]
    assert await storage.queue_depth() == 2
    # Acked, the relay id is still remembered: a late retry is not delivered again.
    await storage.ack("bob", first)
    assert await relay("a.example", 7, "alice@a.example", b"m", 4.0) is None
    assert await storage.forget_relays(2.5) == 1
    assert await relay("a.example", 7, "alice@a.example", b"m", 5.0) is not None


async def test_concurrent_copies_of_one_relay_deliver_once(storage: Storage) -> None:
    await make_users(storage, "bob")
    results = await asyncio.gather(*(storage.enqueue_relayed(
        "a.example", 1, "alice@a.example", ["bob"], b"x", 1.0) for _ in range(8)))
    assert sum(r is not None for r in results) == 1
    assert len(await storage.fetch("bob", 10)) == 1


async def test_relay_ids_survive_a_reopen_and_each_device_queue_gets_a_copy(
        storage_factory: StorageFactory) -> None:
    s = storage_factory()
    await s.open()
    await make_users(s, "bob")
    ids = await s.enqueue_relayed("a.example", 3, "alice@a.example", ["bob", "bob#d2"],
                                  b"m", 1.0)
    assert ids is not None and len(set(ids)) == 2
    await s.close()
    s = storage_factory()
    await s.open()
    try:
        assert await s.enqueue_relayed("a.example", 3, "alice@a.example", ["bob"], b"m",
                                       2.0) is None
        assert [m.payload for m in await s.fetch("bob", 10)] == [b"m"]
        assert [m.payload for m in await s.fetch("bob#d2", 10)] == [b"m"]
        assert await s.queue_depth() == 2
    finally:
        await s.close()


async def test_mailbox_count_counts_one_recipients_messages(storage: Storage) -> None:
    await make_users(storage, "s", "r1", "r2")
    assert await storage.mailbox_count("r1") == 0
    ids = await storage.enqueue("s", ["r1", "r1", "r2"], b"x", 1.0)
    await storage.enqueue("s", ["@fed:b.example"], b"y", 2.0)
    assert await storage.mailbox_count("r1") == 2
    assert await storage.mailbox_count("@fed:b.example") == 1
    await storage.ack("r1", ids[:1])
    assert await storage.mailbox_count("r1") == 1
