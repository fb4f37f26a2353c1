"""This device's view of its account's devices: which it knows, linking a new one, and
the check that the server did not add one behind the user's back.

Known devices live in PROFILE_DIR/devices/<server>/<user>.json (0600). A device in the
account's logged device set that this one does not know is accepted only when a known
device endorsed it (an Ed25519 signature the server cannot make) or when this device
approved the link itself (the new device's MAC under the link code's key). Anything
else is a device the server (or a database thief) added: a KtViolation, exit 2.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qpq_server.client.errors import ClientError, KtViolation
from qpq_server.client.kt import Caller, KtVerifier
from qpq_server.client.profile import Profile, server_file_name
from qpq_server.devices import (
    LINK_CODE_TTL_S,
    device_id,
    endorsement_message,
    link_keys,
    link_mac,
    split_device_set,
)
from qpq_server.fsutil import write_atomic
from qpq_server.identity import identity_change_message, verify_signature

__all__ = ["DeviceBook", "DeviceInfo", "check_devices", "link_code", "new_link_code",
           "start_link", "wait_and_endorse"]

_CODE_ALPHABET = "ABCDEFGHJKMNPQRSTVWXYZ23456789"  # no 0/O, 1/I/L: read aloud, typed


@dataclass(frozen=True)
class DeviceInfo:
    id: str
    identity: bytes
    created_at: float
    this_device: bool
    endorsed_by: tuple[str, ...]


def new_link_code() -> str:
    """12 symbols (~59 bits), shown as XXXX-XXXX-XXXX; scrypt makes offline guessing
    from the verifier costly, and the server drops an approval after 5 wrong codes."""
    raw = "".join(secrets.choice(_CODE_ALPHABET) for _ in range(12))
    return "-".join(raw[i:i + 4] for i in range(0, 12, 4))


def link_code(code: str) -> tuple[bytes, bytes]:
    """(verifier, mac key) of a code; ClientError when it cannot be one."""
    cleaned = "".join(c for c in code.upper() if c.isalnum())
    if len(cleaned) != 12 or any(c not in _CODE_ALPHABET for c in cleaned):
        raise ClientError("usage", "a link code is 12 letters and digits as "
                                   "`qpq-client link` printed it (e.g. ABCD-EFGH-JKMN)")
    return link_keys(cleaned)


class DeviceBook:
    """The devices this device knows for one user on one server, and its pending link
    approvals (MAC keys, kept until they expire)."""

    def __init__(self, profile_dir: Path, server: str, username: str) -> None:
        self.path = (profile_dir / "devices" / server_file_name(server)
                     / f"{username}.json")

    def _load(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {"known": [], "links": []}
        except (OSError, ValueError) as exc:
            raise ClientError("devices_unreadable",
                              f"cannot read known devices {self.path}: {exc}") from None
        if not isinstance(data, dict):
            raise ClientError("devices_unreadable", f"{self.path}: not a JSON object")
        return data

    def _save(self, data: dict[str, Any]) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomic(self.path, json.dumps(data, indent=1, sort_keys=True), mode=0o600)

    @property
    def exists(self) -> bool:
        return self.path.exists()

    def known(self) -> set[str]:
        return {str(d) for d in self._load().get("known", [])}

    def set_known(self, ids: set[str]) -> None:
        data = self._load()
        data["known"] = sorted(ids)
        self._save(data)

    def add_link(self, mac_key: bytes, expires_at: float) -> None:
        data = self._load()
        now = time.time()
        data["links"] = [entry for entry in data.get("links", [])
                         if float(entry["expires_at"]) > now] + [
            {"mac_key": mac_key.hex(), "expires_at": expires_at}]
        self._save(data)

    def link_keys(self) -> list[bytes]:
        now = time.time()
        return [bytes.fromhex(e["mac_key"]) for e in self._load().get("links", [])
                if float(e["expires_at"]) > now]


async def _fetch_devices(conn: Caller, kt: KtVerifier, profile: Profile,
                         session: str) -> tuple[list[bytes], list[dict[str, Any]]]:
    """The account's device records, checked against the logged device set."""
    answer = await conn.call("devices", session=session,
                             device=device_id(profile.identity_public))
    value = answer.get("identity_key")
    if not isinstance(value, bytes):
        raise KtViolation("kt_bad_response", "server sent no device set")
    await kt.verify_key(profile.username, value, answer.get("kt"))
    try:
        identities = split_device_set(value)
    except ValueError as exc:
        raise KtViolation("kt_bad_response", f"the logged device set is malformed: {exc}"
                          ) from None
    records = [r for r in answer.get("devices") or [] if isinstance(r, dict)]
    if sorted(bytes(r.get("identity_key") or b"") for r in records) != identities:
        raise KtViolation("kt_bad_response", "the server's device list differs from the "
                          "device set its key-transparency log shows")
    return identities, records


def _endorsed(username: str, record: dict[str, Any], known: dict[str, bytes],
              known_before: set[str]) -> list[str]:
    """Which known devices signed for this one (signatures the server cannot make): an
    endorsement by a current device, or the handover of a device that rotated its key
    (signed by the old key, which this device knew)."""
    endorsements = record.get("endorsements") or {}
    new = bytes(record["identity_key"])
    signed = [endorser for endorser, signature in endorsements.items()
              if endorser in known and isinstance(signature, bytes)
              and verify_signature(known[endorser], signature,
                                   endorsement_message(username, known[endorser], new))]
    handover = record.get("handover")
    if isinstance(handover, bytes) and len(handover) == 128:
        old, signature = handover[:64], handover[64:]
        if device_id(old) in known_before and verify_signature(
                old, signature, identity_change_message(username, old, new)):
            signed.append(device_id(old))
    return signed


async def check_devices(conn: Caller, kt: KtVerifier, profile: Profile, session: str,
                        book: DeviceBook, *, trust_current: bool = False) -> list[DeviceInfo]:
    """Verify the account's device set; learn devices a known one vouched for, endorse
    those this device approved, and raise KtViolation (exit 2) for any other new device.
    `trust_current`: a device that has just been set up takes the set as it is."""
    identities, records = await _fetch_devices(conn, kt, profile, session)
    me = device_id(profile.identity_public)
    if profile.identity_public not in identities:
        raise ClientError("device_unlinked",
                          f"this device ({me}) is no longer one of {profile.username}'s "
                          "devices: it was unlinked. Set it up again with a link code from "
                          "a current device (`qpq-client link`)")
    by_id = {device_id(bytes(r["identity_key"])): r for r in records}
    known_ids = book.known() | {me}
    known_before = set(known_ids)
    if trust_current or not book.exists:
        known_ids |= set(by_id)
    known_ids &= set(by_id)  # unlinked devices are forgotten
    changed = True
    while changed:  # an endorsement by a device learnt just now counts too
        changed = False
        known = {d: bytes(by_id[d]["identity_key"]) for d in known_ids}
        for did, record in by_id.items():
            if did not in known_ids and _endorsed(profile.username, record, known,
                                                  known_before):
                known_ids.add(did)
                changed = True
    unknown = []
    for did, record in by_id.items():
        if did in known_ids:
            continue
        mac = record.get("link_mac")
        if isinstance(mac, bytes) and any(
                link_mac(key, profile.username, bytes(record["identity_key"])) == mac
                for key in book.link_keys()):
            await _endorse(conn, profile, session, did, bytes(record["identity_key"]))
            known_ids.add(did)
        else:
            unknown.append(did)
    book.set_known(known_ids)
    if unknown:
        raise KtViolation(
            "kt_unknown_device",
            f"the key-transparency log lists device(s) {', '.join(unknown)} for "
            f"{profile.username} that no device of yours approved. Your contacts now "
            "encrypt to it: if you did not link a device, someone with your password or "
            f"the server itself added it; remove it with `qpq-client unlink "
            f"{profile.username} DEVICE` and change your password")
    return [DeviceInfo(did, bytes(r["identity_key"]), float(r.get("created_at") or 0),
                       did == me, tuple(sorted((r.get("endorsements") or {}).keys())))
            for did, r in by_id.items()]


async def _endorse(conn: Caller, profile: Profile, session: str, target: str,
                   identity: bytes) -> None:
    signature = profile.sign(endorsement_message(profile.username, profile.identity_public,
                                                 identity))
    await conn.call("device_endorse", session=session,
                    device=device_id(profile.identity_public), target=target,
                    signature=signature)


async def start_link(conn: Caller, profile: Profile, session: str,
                     book: DeviceBook) -> str:
    """Ask the server to admit one new device with a fresh code; keep its MAC key."""
    code = new_link_code()
    verifier, mac_key = link_code(code)
    answer = await conn.call("link_start", session=session,
                             device=device_id(profile.identity_public),
                             verifier_hash=hashlib.sha256(verifier).digest())
    book.add_link(mac_key, float(answer.get("expires_at") or time.time() + LINK_CODE_TTL_S))
    return code


async def wait_and_endorse(conn: Caller, kt: KtVerifier, profile: Profile, session: str,
                           book: DeviceBook, wait_s: float) -> DeviceInfo | None:
    """Poll until the device this one approved shows up, then vouch for it."""
    deadline = time.monotonic() + wait_s
    before = book.known()
    while True:
        devices = await check_devices(conn, kt, profile, session, book)
        new = [d for d in devices if d.id not in before and not d.this_device]
        if new or time.monotonic() >= deadline:
            return new[0] if new else None
        await asyncio.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
