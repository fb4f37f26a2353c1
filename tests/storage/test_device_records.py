"""Device records on every backend (sqlcipher, file, postgres): an account from before
devices reads as one device on its old queue, and records round-trip through meta."""

from __future__ import annotations

from qpq_server.device_registry import DeviceRecord, DeviceRegistry
from qpq_server.devices import device_id, join_device_set
from qpq_server.storage.base import Storage


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
