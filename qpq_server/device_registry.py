"""The server's record of each account's devices, kept in storage meta (every backend
has it, so no schema migration is needed).

The device *set* is authoritative where clients can check it: the account's logged
identity value (see `qpq_server.devices`). The meta record `devices:USER` only adds
what the log does not carry: when a device was added, its mailbox, the link MAC the
new device left for the device that approved it, and endorsements by existing devices.
`load` reconciles the two, so an account from before devices existed (one identity, no
record) reads as one device whose mailbox is the account name: its queued messages,
signed prekey (`spk:USER`) and sessions keep working without a migration step.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace

from qpq_server.devices import device_id, split_device_set
from qpq_server.storage.base import Account, Storage

__all__ = ["LINK_META", "SPK_META", "DeviceRecord", "DeviceRegistry"]

_META = "devices:"
LINK_META = "link:"  # a pending link approval: hash of the verifier, expiry, tries left
SPK_META = "spk:"  # + mailbox: the device's signed prekey || its signature


@dataclass(frozen=True)
class DeviceRecord:
    id: str
    identity: bytes
    created_at: float
    mailbox: str  # the queue its copies go to: USER for the first device, else USER#ID
    link_mac: bytes = b""
    endorsements: dict[str, bytes] = field(default_factory=dict)  # endorser id -> sig
    handover: bytes = b""  # a rotated key: the old identity(64) || its signature(64)

    @property
    def tag(self) -> bytes:
        return bytes.fromhex(self.id)

    def to_wire(self) -> dict[str, object]:
        return {"device": self.id, "identity_key": self.identity,
                "created_at": self.created_at, "link_mac": self.link_mac or None,
                "endorsements": dict(self.endorsements), "handover": self.handover or None}


class DeviceRegistry:
    def __init__(self, storage: Storage) -> None:
        self._storage = storage

    async def load(self, account: Account) -> dict[str, DeviceRecord]:
        """The account's current devices (in the order they were added)."""
        if account.identity_key is None:
            return {}
        return _reconcile(account, await self._storage.get_meta(_META + account.username))

    async def load_user(self, username: str,
                        ) -> tuple[Account | None, dict[str, DeviceRecord]]:
        """The account (None if there is none) and its devices, in one storage read."""
        account, raw = await self._storage.account_with_meta(username, _META + username)
        return account, _reconcile(account, raw) if account is not None else {}

    async def recorded(self, username: str) -> bool:
        """False for an account from before devices (nothing written yet)."""
        return bool(await self._storage.get_meta(_META + username))

    async def save(self, username: str, records: dict[str, DeviceRecord]) -> None:
        await self._storage.set_meta(_META + username, json.dumps({
            r.id: {"identity": r.identity.hex(), "created_at": r.created_at,
                   "mailbox": r.mailbox, "link_mac": r.link_mac.hex(),
                   "endorsements": {k: v.hex() for k, v in r.endorsements.items()},
                   "handover": r.handover.hex()}
            for r in records.values()}))

    @staticmethod
    def endorse(record: DeviceRecord, endorser: str, signature: bytes) -> DeviceRecord:
        return replace(record, endorsements={**record.endorsements, endorser: signature})


def _parse(raw: str) -> dict[str, DeviceRecord]:
    data = json.loads(raw)
    return {did: DeviceRecord(did, bytes.fromhex(r["identity"]), float(r["created_at"]),
                              str(r["mailbox"]), bytes.fromhex(r.get("link_mac", "")),
                              {k: bytes.fromhex(v)
                               for k, v in r.get("endorsements", {}).items()},
                              bytes.fromhex(r.get("handover", "")))
            for did, r in data.items()}


def _reconcile(account: Account, raw: str | None) -> dict[str, DeviceRecord]:
    """The logged device set, with what the meta record `raw` adds to each device."""
    if account.identity_key is None:
        return {}
    try:
        identities = split_device_set(account.identity_key)
    except ValueError:
        identities = [account.identity_key]  # not a set: treat as one legacy key
    stored = _parse(raw) if raw else {}
    records: dict[str, DeviceRecord] = {}
    for record in sorted(stored.values(), key=lambda r: r.created_at):
        if record.identity in identities:
            records[record.id] = record
    for identity in identities:  # logged but unrecorded: a pre-devices account
        did = device_id(identity)
        if did not in records:
            taken = any(r.mailbox == account.username for r in records.values())
            records[did] = DeviceRecord(
                did, identity, account.created_at,
                f"{account.username}#{did}" if taken else account.username)
    return records
