"""Device records on every backend (sqlcipher, file, postgres): an account from before
devices reads as one device on its old queue, records round-trip through meta, and a
change of the device set is a compare-and-set."""

from __future__ import annotations

import asyncio

import pytest

from qpq_server.device_registry import DeviceRecord, DeviceRegistry
from qpq_server.devices import device_id, join_device_set
from qpq_server.errors import ServerBusy
from qpq_server.storage.base import Expected, Storage


async def test_an_account_from_before_devices_is_one_device_on_its_old_queue(
        storage: Storage) -> None:
    await storage.create_account("old", b"pf", 1, 10.0)
    await storage.set_identity_key("old", b"\x07" * 64)  # what an old server stored
    await storage.enqueue("someone", ["old"], b"waiting", 11.0)
    account = await storage.get_account("old")
    assert account is not None
    (record,) = (await DeviceRegistry(storage).load(account)).values()
    assert (record.id, record.mailbox, record.created_at) == (
        device_id(b"\x07" * 64), "old", 10.0)
    assert [m.payload for m in await storage.fetch(record.mailbox, 10)] == [b"waiting"]


async def test_records_round_trip_and_follow_the_logged_set(storage: Storage) -> None:
    await storage.create_account("two", b"pf", 1, 10.0)
    first, second, gone = b"\x01" * 64, b"\x02" * 64, b"\x03" * 64
    registry = DeviceRegistry(storage)
    records = {device_id(k): DeviceRecord(device_id(k), k, at, mailbox)
               for k, at, mailbox in ((first, 10.0, "two"), (second, 20.0, "two#x"),
                                      (gone, 30.0, "two#y"))}
    records[device_id(second)] = DeviceRegistry.endorse(records[device_id(second)],
                                                        device_id(first), b"s" * 64)
    await registry.save("two", records)
    await storage.set_identity_key("two", join_device_set([first, second]))
    account = await storage.get_account("two")
    assert account is not None
    loaded = await registry.load(account)  # the set decides: the third is not current
    assert list(loaded.values()) == [records[device_id(first)], records[device_id(second)]]
    await storage.set_identity_key("two", join_device_set([first, second, b"\x04" * 64]))
    account = await storage.get_account("two")
    assert account is not None
    newest = list((await registry.load(account)).values())[-1]  # logged, not recorded
    assert newest.identity == b"\x04" * 64 and newest.mailbox == f"two#{newest.id}"


async def test_a_device_set_change_is_a_compare_and_set(storage: Storage) -> None:
    """Two changes made from the same device set (two workers or nodes linking or
    unlinking at once): one wins, the other is refused (server_busy), nothing is
    overwritten, and the log records only the winner."""
    await storage.create_account("cas", b"pf", 1, 10.0)
    base = join_device_set([b"\x01" * 64])
    await storage.publish_identity_key("cas", base, b"leaf-base", 11.0)
    left, right = join_device_set([b"\x01" * 64, b"\x02" * 64]), b"\x03" * 64
    results = await asyncio.gather(
        storage.publish_identity_key("cas", left, b"leaf-left", 12.0, expected=Expected(base)),
        storage.publish_identity_key("cas", right, b"leaf-right", 12.0,
                                     expected=Expected(base)),
        return_exceptions=True)
    won = [r for r in results if isinstance(r, int)]
    lost = [r for r in results if isinstance(r, ServerBusy)]
    assert len(won) == 1 and len(lost) == 1, results
    winner = left if isinstance(results[0], int) else right
    account = await storage.get_account("cas")
    assert account is not None and account.identity_key == winner
    assert [leaf.leaf for leaf in await storage.kt_leaves()] == [
        b"leaf-base", b"leaf-left" if winner == left else b"leaf-right"]
    # Unlogged sets (no KT) too; and None is a set of its own (never published).
    with pytest.raises(ServerBusy):
        await storage.set_identity_key("cas", b"\x09" * 64, expected=Expected(base))
    await storage.set_identity_key("cas", b"\x09" * 64, expected=Expected(winner))
    await storage.create_account("fresh", b"pf", 1, 10.0)
    with pytest.raises(ServerBusy):
        await storage.publish_identity_key("fresh", base, b"l", 13.0, expected=Expected(base))
    assert await storage.publish_identity_key("fresh", base, b"l", 13.0,
                                              expected=Expected(None)) == 2
