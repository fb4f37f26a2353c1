"""High-level client operations: register, login, send, receive (decrypting locally)."""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import opaque_ke_py as opaque

from qpq_server.client.connection import ClientError, QpqConnection
from qpq_server.client.contacts import ContactPins
from qpq_server.client.devices import (
    DeviceBook,
    DeviceInfo,
    check_devices,
    link_code,
    start_link,
    wait_and_endorse,
)
from qpq_server.client.e2e import (
    DecryptError,
    RecipientKey,
    open_envelope,
    parse_envelope,
    seal,
)
from qpq_server.client.errors import IdentityChanged, KtViolation
from qpq_server.client.files import FileDecryptError, decrypt_stream, encrypt_stream
from qpq_server.client.kt import KeyVerified, KtVerifier
from qpq_server.client.profile import REPLAY_WINDOW_S, Profile, ServerState
from qpq_server.client.terminal import safe_file_name
from qpq_server.devices import device_id, link_mac, split_device_set, wrap_label
from qpq_server.identity import signed_prekey_message, verify_signature

__all__ = ["QpqClient", "ReceivedMessage"]


class _DomainCaller:
    """Our connection, asking about another domain's log (the server relays the call)."""

    def __init__(self, conn: QpqConnection, domain: str) -> None:
        self._conn = conn
        self._domain = domain
        self.server = f"domain-{domain}"  # names the pinned head file

    async def call(self, op: str, timeout: float | None = None,
                   **fields: Any) -> dict[str, Any]:
        return await self._conn.call(op, timeout, domain=self._domain, **fields)

KEY_PACKAGE_TARGET = 20
KEY_PACKAGE_LOW_WATER = 10


@dataclass(frozen=True)
class ReceivedMessage:
    id: int
    sender: str
    text: str
    sent_at: float
    content: dict[str, Any]
    verified: bool = True  # False: shown only as a rejection, with `error` saying why
    error: str | None = None


@dataclass(frozen=True)
class _PendingAck:
    """Messages a deferred `receive` handed over, to be acked by the next fetch."""

    device: str
    ids: list[int]
    used: list[tuple[bytes, bytes]]  # (one-time key, replay id) to settle once acked


def _rejected(item: dict[str, Any], code: str, why: object) -> ReceivedMessage:
    return ReceivedMessage(id=int(item["id"]), sender=str(item["from"]),
                           text=f"[rejected: {why}]", sent_at=float(item["sent_at"]),
                           content={"type": "error"}, verified=False, error=code)


def _free_name(directory: Path, name: str) -> Path:
    target = directory / name
    stem, suffix, n = target.stem, target.suffix, 1
    while target.exists():
        target = directory / f"{stem} ({n}){suffix}"
        n += 1
    return target


def _sending_device(claimed: bytes, device_set: bytes) -> bytes:
    """The identity the envelope names, when it is one of the sender's verified devices;
    otherwise the set itself (so the open fails as a forged sender)."""
    try:
        return claimed if claimed in split_device_set(device_set) else device_set
    except ValueError:
        return device_set


class QpqClient:
    def __init__(self, connection: QpqConnection, profile_dir: Path) -> None:
        self.conn = connection
        self.profile_dir = profile_dir
        self.server = connection.server  # names this server's state in profiles
        # address + its key-transparency key, once `identify_server` ran: names what must
        # not carry over to a re-initialised server at the same address (message ids)
        self.server_id = self.server
        self._server_key: tuple[bytes, bool] | None = None
        self.kt = KtVerifier(connection, profile_dir)
        self.more_waiting = False  # the last fetch said more messages wait (page by bytes)
        self.pins = ContactPins(profile_dir, connection.server)
        self.replays_dropped = 0  # envelopes already accepted once, dropped by `receive`
        self._devices_checked: set[str] = set()
        self._peer_kt: dict[str, KtVerifier] = {}  # other domains' logs, by domain
        self._unacked: dict[str, _PendingAck] = {}  # per user: rides on the next fetch
        # False once this server answered a fetch carrying acks without `acked` (a server
        # from before `fetch` took them): from then on acks go alone, before the fetch.
        self._fetch_takes_acks = True

    def profile(self, username: str) -> Profile:
        """The profile as it is on disk now (another process may have changed it): read
        it afresh for each use, change it only through `_edit`."""
        return Profile.load_or_create(self.profile_dir, username, self.server)

    @contextmanager
    def _edit(self, username: str) -> Iterator[Profile]:
        with Profile.edit(self.profile_dir, username, self.server) as profile:
            yield profile

    async def identify_server(self, username: str) -> bool:
        """Check the server is the one the profile knows (its key-transparency key is
        pinned per address: KtViolation when it changed); state recorded for another
        server at this address (a pin deleted after a re-initialisation) is dropped.
        True when the server is new to this profile."""
        if self._server_key is None:  # once per connection
            self._server_key = await self.kt.server_key()
        key, pinned = self._server_key
        self.server_id = f"{self.server}#{key.hex()[:16]}"
        profile = self.profile(username)
        if not profile.path.exists():
            return True
        state = profile.servers.get(self.server)
        if state is not None and state.log_key and state.log_key != key:
            with self._edit(username) as current:
                current.servers[self.server] = ServerState(log_key=key)
        return not (pinned and profile.knows(self.server))

    def knows_server(self, username: str) -> bool:
        """Has `username`'s profile been used with this server before?"""
        return self.profile(username).knows(self.server)

    async def register(self, username: str, password: str) -> None:
        start = opaque.client_registration_start(password.encode())
        response = await self.conn.call("register_start", username=username,
                                        request=start.get_message())
        finish = opaque.client_registration_finish(password.encode(), start.get_state(),
                                                   response["response"])
        await self.conn.call("register_finish", username=username, upload=finish.get_message())
        await self.login(username, password)

    async def login(self, username: str, password: str,
                    link: str | None = None) -> Profile:
        start = opaque.client_login_start(password.encode())
        response = await self.conn.call("login_start", username=username,
                                        request=start.get_message())
        try:
            finish = opaque.client_login_finish(password.encode(), start.get_state(),
                                                response["response"])
        except ValueError:
            # Tell the server too, so its failure counter sees the attempt.
            await self.conn.call_raw({"op": "login_finish", "login_id": response["login_id"],
                                      "finalization": b""})
            raise ClientError("login_failed", "wrong username or password") from None
        # The session is this device's: it acts for this device alone, and unlinking
        # another device leaves it running. (A new profile's keys reach the disk first:
        # the session names them.)
        with self._edit(username) as saved:
            device = device_id(saved.identity_public)
        result = await self.conn.call("login_finish", login_id=response["login_id"],
                                      finalization=finish.get_message(), device=device)
        with self._edit(username) as profile:
            state = profile.state()
            state.session, state.session_expires = result["session"], result["expires_at"]
        if result.get("setup_version", 0) < result.get("current_setup_version", 0):
            await self._reregister(result["session"], password)
        # Check the account's logged devices (one this device does not know, and no
        # known device vouched for, means someone added it); a fresh device (or a server
        # new to this profile) checks after publishing its first key, and takes the set
        # it joins as it is.
        fresh = not state.published_identity
        if not fresh:
            await self.check_own_devices(profile)
        await self.publish_keys(profile, link=link)
        if fresh:
            await self.check_own_devices(profile, trust_current=True)
        with self._edit(username) as current:  # which server this state belongs to
            current.state().log_key = self.kt.pinned_key() or b""
        return current

    def device_book(self, username: str) -> DeviceBook:
        return DeviceBook(self.profile_dir, self.conn.server, username)

    async def check_own_devices(self, profile: Profile,
                                trust_current: bool = False) -> list[DeviceInfo]:
        """The log must list this device, and only devices it knows or that a known
        device vouched for (KtViolation `kt_unknown_device` otherwise)."""
        return await check_devices(self.conn, self.kt, profile,
                                   self._session(profile.username),
                                   self.device_book(profile.username),
                                   trust_current=trust_current)

    async def link(self, username: str, password: str) -> str:
        """Approve one new device: prove the password here, get a one-use code (valid
        LINK_CODE_TTL_S) for the new device's `login --link-code`."""
        profile = await self.login(username, password)
        return await start_link(self.conn, profile, self._session(username),
                                self.device_book(username))

    async def wait_for_linked_device(self, username: str, wait_s: float) -> DeviceInfo | None:
        """After `link`: wait for the new device, check its MAC and vouch for it."""
        return await wait_and_endorse(self.conn, self.kt, self.profile(username),
                                      self._session(username), self.device_book(username),
                                      wait_s)

    async def unlink(self, username: str, password: str, device: str) -> int:
        """Remove one device (password proved here); returns how many remain. The
        account's sessions end; this device gets a fresh one."""
        profile = await self.login(username, password)
        result = await self.conn.call("unlink", session=self._session(username),
                                      device=device_id(profile.identity_public),
                                      target=device)
        with self._edit(username) as profile:
            state = profile.state()
            state.session, state.session_expires = result["session"], result["expires_at"]
        if device != device_id(profile.identity_public):
            await self.check_own_devices(profile)
        return int(result["devices"])

    async def check_own_key(self, profile: Profile) -> None:
        """Kept for callers from before devices: the device check."""
        await self.check_own_devices(profile)

    async def _reregister(self, session: str, password: str) -> None:
        """The server rotated its OPAQUE setup: move our record to the new one."""
        start = opaque.client_registration_start(password.encode())
        response = await self.conn.call("reregister_start", session=session,
                                        request=start.get_message())
        finish = opaque.client_registration_finish(password.encode(), start.get_state(),
                                                   response["response"])
        await self.conn.call("reregister_finish", session=session, upload=finish.get_message())

    async def change_password(self, username: str, old: str, new: str) -> None:
        """Prove the old password (a login on this connection), then register the new
        one; the server revokes every other session of the account."""
        await self.login(username, old)
        session = self._session(username)
        start = opaque.client_registration_start(new.encode())
        response = await self.conn.call("passwd_start", session=session,
                                        request=start.get_message())
        finish = opaque.client_registration_finish(new.encode(), start.get_state(),
                                                   response["response"])
        result = await self.conn.call("passwd_finish", session=session,
                                      upload=finish.get_message())
        with self._edit(username) as profile:
            state = profile.state()
            state.session, state.session_expires = result["session"], result["expires_at"]

    async def logout(self, username: str) -> None:
        """End every session of the account (on all devices) and forget ours."""
        await self.conn.call("logout", session=self._session(username))
        with self._edit(username) as profile:
            state = profile.state()
            state.session, state.session_expires = None, 0.0

    def has_session(self, username: str) -> bool:
        state = self.profile(username).state()
        return bool(state.session) and state.session_expires > time.time() + 30

    def _session(self, username: str) -> str:
        session = self.profile(username).state().session
        if not session:
            raise ClientError("invalid_session",
                              f"{username} is not logged in on {self.server}")
        return session

    async def publish_keys(self, profile: Profile, link: str | None = None) -> int:
        """Publish the identity (once per server: that adds this device to the account,
        with the link code when the account has a device already), the current signed
        prekey (when new or rotated) and top up one-time packages. Private halves reach
        the disk first."""
        username = profile.username
        session = self._session(username)
        with self._edit(username) as current:  # a rotated prekey reaches the disk first
            prekey, signature = current.current_prekey(time.time())
            state = current.state()
            fields: dict[str, Any] = {"device": device_id(current.identity_public)}
            if not state.published_identity:
                fields["identity_key"] = current.identity_public
                if link is not None:
                    verifier, mac_key = link_code(link)
                    fields.update(link_code=verifier, link_mac=link_mac(
                        mac_key, username, current.identity_public))
            if not state.published_identity or state.published_prekey != prekey:
                fields.update(signed_prekey=prekey, signed_prekey_signature=signature)
        result = await self.conn.call("publish_keys", session=session, key_packages=[],
                                      **fields)
        count = int(result["key_packages"])
        with self._edit(username) as current:
            current.state().published_identity = True
            current.state().published_prekey = prekey
        if count < KEY_PACKAGE_LOW_WATER:
            # private halves on disk before the public halves are published
            with self._edit(username) as current:
                fresh = current.new_one_time_keys(KEY_PACKAGE_TARGET - count)
            result = await self.conn.call("publish_keys", session=session, key_packages=fresh,
                                          device=fields["device"])
            count = int(result["key_packages"])
        return count

    async def send(self, sender: str, recipients: Sequence[str], content: dict[str, Any],
                   blobs: Sequence[bytes] = ()) -> list[int]:
        """One envelope for this domain (and our other devices), one per other domain:
        another domain's users know us as SENDER@OUR_DOMAIN and themselves by their bare
        name, both of which an envelope binds."""
        groups = self._by_domain(recipients)
        if blobs and any(domain is not None for domain in groups):
            raise ClientError("usage", "attachments cannot be sent to other domains yet; "
                              "send the file to users of your own domain only")
        ids = await self._send_local(sender, groups.pop(None, []), content, blobs)
        for domain, users in groups.items():
            assert domain is not None
            ids += await self._send_remote(sender, domain, users, content)
        return ids

    async def _send_remote(self, sender: str, domain: str, users: Sequence[str],
                           content: dict[str, Any]) -> list[int]:
        session = self._session(sender)
        profile = self.profile(sender)
        names = [f"{user}@{domain}" for user in users]
        keys = [k for name in names for k in await self._recipient_keys(session, name)]
        head = self.kt.pinned_head()
        if head is not None:  # gossip: the recipient checks it against our domain's log
            content = {**content, "kt_head": head.to_wire()}
        envelope = seal(content, f"{sender}@{self.domain}", profile.identity,
                        profile.identity_public, keys, int(time.time() * 1000))
        result = await self.conn.call("enqueue", session=session, recipients=names,
                                      payload=envelope,
                                      device=device_id(profile.identity_public))
        return list(result["ids"])

    async def _send_local(self, sender: str, names: list[str], content: dict[str, Any],
                          blobs: Sequence[bytes]) -> list[int]:
        session = self._session(sender)
        profile = self.profile(sender)
        keys = [k for name in names for k in await self._recipient_keys(session, name)]
        own = [k for k in await self._own_device_keys(session, profile) if sender not in names]
        keys += own
        if not keys:
            return []  # only other domains' users, and no other device of ours
        head = self.kt.pinned_head()
        if head is not None:  # gossip: recipients check it lies on the log they see
            content = {**content, "kt_head": head.to_wire()}
        envelope = seal(content, sender, profile.identity, profile.identity_public, keys,
                        int(time.time() * 1000))
        extra: dict[str, Any] = {"blobs": list(blobs)} if blobs else {}
        # The sender among the recipients means its *other* devices (copies for them).
        result = await self.conn.call("enqueue", session=session,
                                      recipients=names + ([sender] if own else []),
                                      payload=envelope,
                                      device=device_id(profile.identity_public), **extra)
        return list(result["ids"])

    async def _own_device_keys(self, session: str, profile: Profile) -> list[RecipientKey]:
        """This account's other devices get a copy of what it sends (the device set is
        checked like a contact's, and against the devices this one knows)."""
        book = self.device_book(profile.username)
        if len(book.known()) <= 1:
            return []
        keys = await self._recipient_keys(session, profile.username, own=True)
        if any(device_id(k.identity) not in book.known() for k in keys):
            # linked by another of our devices since we last looked: learn it (or stop
            # here, loudly, if no device of ours vouched for it)
            await self.check_own_devices(profile)
        known = book.known()
        return [k for k in keys if k.identity != profile.identity_public
                and device_id(k.identity) in known]

    # -- other domains (federation) -------------------------------------------------------
    @property
    def domain(self) -> str | None:
        """Our server's federation domain (None when it does not federate)."""
        value = self.conn.hello.get("federation_domain")
        return str(value) if value else None

    def _split(self, name: str) -> tuple[str, str | None]:
        """(user, domain) for USER@DOMAIN of another domain, (name, None) for a local one."""
        user, sep, domain = name.partition("@")
        if not sep or domain.lower() == self.domain:
            return user, None
        if self.domain is None:
            raise ClientError("not_federated", f"{name}: this server does not federate with "
                              "other domains, so USER@DOMAIN names nobody here")
        return user, domain.lower()

    def _by_domain(self, recipients: Sequence[str]) -> dict[str | None, list[str]]:
        """Bare user names grouped by domain (None: ours)."""
        groups: dict[str | None, list[str]] = {}
        for name in dict.fromkeys(recipients):
            user, domain = self._split(name)
            if user not in groups.setdefault(domain, []):
                groups[domain].append(user)
        return groups

    def _kt_for(self, domain: str | None) -> KtVerifier:
        """Our server's log, or another domain's read through our server (pinned apart)."""
        if domain is None:
            return self.kt
        if domain not in self._peer_kt:
            self._peer_kt[domain] = KtVerifier(_DomainCaller(self.conn, domain),
                                               self.profile_dir)
        return self._peer_kt[domain]

    async def lookup(self, name: str) -> KeyVerified:
        """NAME's current device set, proven by the log of NAME's domain."""
        user, domain = self._split(name)
        return await self._kt_for(domain).lookup(user)

    async def _recipient_keys(self, session: str, name: str,
                              own: bool = False) -> list[RecipientKey]:
        """One key per current device of `name`, each proven: the device set is the
        one the log shows (and matches the pin), and each prekey is signed by its
        device's identity. A missing or extra device stops the send."""
        bundle = await self.conn.call("get_keys", session=session, username=name)
        identity = bundle.get("identity_key")
        if not isinstance(identity, bytes):
            raise KtViolation("kt_bad_response", f"server sent no identity key for {name}")
        # Never encrypt to a key the server's signed, append-only log does not show,
        # nor to one that differs from the key pinned for this contact. Another domain's
        # user is checked against that domain's log, under the name it knows them by.
        user, domain = self._split(name)
        await self._kt_for(domain).verify_key(user, identity, bundle.get("kt"))
        if not own:
            self.pins.check(name, identity)
        try:
            devices = split_device_set(identity)
        except ValueError as exc:
            raise KtViolation("kt_bad_response", f"{name}'s logged device set is malformed "
                              f"({exc}); not sending") from None
        raw = bundle.get("devices")
        bundles = raw if isinstance(raw, list) else [{**bundle, "identity_key": identity}]
        keys = [self._device_key(user, b) for b in bundles if isinstance(b, dict)]
        if sorted(k.identity for k in keys) != devices:
            raise KtViolation("kt_bad_response",
                              f"the server's key bundles for {name} do not match the "
                              "device set its key-transparency log shows; not sending")
        return keys

    @staticmethod
    def _device_key(name: str, bundle: dict[str, Any]) -> RecipientKey:
        identity = bundle.get("identity_key")
        if not isinstance(identity, bytes):
            raise KtViolation("kt_bad_response", f"server sent no identity key for {name}")
        prekey, signature = bundle.get("signed_prekey"), bundle.get("signed_prekey_signature")
        if not isinstance(prekey, bytes) or not isinstance(signature, bytes):
            raise ClientError("no_signed_prekey",
                              f"{name} has no signed prekey yet (their client must log in "
                              "with a current qpq-client); not sending")
        if len(prekey) != 32 or not verify_signature(
                identity, signature, signed_prekey_message(identity, prekey)):
            raise KtViolation("bad_prekey_signature",
                              f"{name}'s signed prekey is not signed by their verified "
                              "identity key; not sending")
        package = bundle.get("key_package")
        return RecipientKey(wrap_label(name, identity), identity, prekey,
                            bytes(package) if isinstance(package, bytes) else None)

    async def send_file(self, sender: str, recipients: Sequence[str], path: Path) -> list[int]:
        """Encrypt the file (streamed, to a temp file), upload the ciphertext as a blob,
        then send the blob id and its key end to end."""
        session = self._session(sender)
        with path.open("rb") as src, tempfile.TemporaryFile() as sealed:
            encrypted = await asyncio.to_thread(encrypt_stream, src, sealed)
            sealed.seek(0)
            await self.conn.put_blob(session, sealed, encrypted.size, encrypted.sha256)
        content = {"type": "file", "name": path.name, "size": encrypted.plain_size,
                   "blob": encrypted.sha256, "blob_size": encrypted.size,
                   "key": encrypted.key, "sent_at": time.time(),
                   "text": f"[file {path.name}, {encrypted.plain_size} bytes]"}
        return await self.send(sender, recipients, content, blobs=[encrypted.sha256])

    async def save_file(self, username: str, message: ReceivedMessage, out_dir: Path) -> Path:
        """Download a file message's blob and decrypt it into out_dir (never overwrites)."""
        content = message.content
        blob, key = content.get("blob"), content.get("key")
        if not (isinstance(blob, bytes) and isinstance(key, bytes)
                and len(blob) == 32 and len(key) == 32):
            raise ClientError("bad_message", "file message without a valid blob id or key")
        out_dir.mkdir(parents=True, exist_ok=True)
        target = _free_name(out_dir, safe_file_name(str(content.get("name", ""))))
        with tempfile.TemporaryFile(dir=out_dir) as sealed:
            await self.conn.get_blob(self._session(username), blob, sealed.write,
                                     device_id(self.profile(username).identity_public))
            sealed.seek(0)
            partial = target.with_name(f".{target.name}.part")
            try:
                with partial.open("wb") as plain:
                    await asyncio.to_thread(decrypt_stream, sealed, key, plain)
                os.replace(partial, target)
            except FileDecryptError as exc:
                raise ClientError("bad_attachment", str(exc)) from None
            finally:
                partial.unlink(missing_ok=True)
        return target

    async def send_text(self, sender: str, recipients: Sequence[str], text: str) -> list[int]:
        return await self.send(sender, recipients,
                               {"type": "text", "text": text, "sent_at": time.time()})

    async def receive(self, username: str, wait_s: float = 0.0, limit: int = 500,
                      before_ack: Callable[[ReceivedMessage], Awaitable[object]] | None = None,
                      defer_ack: bool = False) -> list[ReceivedMessage]:
        """Fetch, authenticate, decrypt, hand each message to `before_ack` (which shows,
        saves or stores it), then ack. A message is acked only after `before_ack`
        returned for it: when it raises, the messages handed over before are acked, the
        exception propagates, and that message and the rest stay queued (they come
        again). Forged or undecryptable messages are handed over marked
        (`verified=False`) and acked; those from a contact whose key changed are handed
        over but stay queued until `trust`; replays are dropped (`replays_dropped`).

        With `defer_ack` the ack is not sent now: the next `receive` of this user
        carries it on its fetch (one request fewer per page), and `flush_acks` sends
        what is left; call it before closing the connection."""
        session = self._session(username)
        timeout = self.conn.timeout + wait_s
        if username not in self._devices_checked:  # a device added behind our back?
            await self.check_own_devices(self.profile(username))
            self._devices_checked.add(username)
        device = device_id(self.profile(username).identity_public)
        pending = self._unacked.pop(username, None)
        if pending is not None and (pending.device != device  # keys changed meanwhile
                                    or not self._fetch_takes_acks):
            self._unacked[username] = pending
            await self.flush_acks(username)
            pending = None
        carried: dict[str, Any] = {"ack": pending.ids} if pending is not None else {}
        try:
            result = await self.conn.call("fetch", timeout=timeout, session=session,
                                          wait_s=wait_s, limit=limit, device=device,
                                          **carried)
        except BaseException:
            if pending is not None:  # not acked: keep it for the next fetch or flush
                self._unacked[username] = pending
            raise
        if pending is not None:
            if "acked" not in result:  # a server from before `fetch` took acks
                self._fetch_takes_acks = False
                await self._ack(username, session, device, pending.ids, pending.used)
                # It read the page before the ack deleted it: read again, past it.
                result = await self.conn.call("fetch", timeout=timeout, session=session,
                                              wait_s=wait_s, limit=limit, device=device)
            else:
                await self._settle_acked(username, pending.used)
        # Read after the (long) wait: another process may have added keys meanwhile.
        profile = self.profile(username)
        received: list[ReceivedMessage] = []
        ack_ids: list[int] = []
        used: dict[int, tuple[bytes, bytes]] = {}  # id -> (one-time key, replay id)
        accepted: set[bytes] = set()  # replay ids accepted in this batch
        identities: dict[str, bytes | IdentityChanged] = {}
        for item in result["messages"]:
            message, rpk, replay_id = await self._open(profile, item, identities)
            if message is None or replay_id in accepted:  # accepted before: drop it
                self.replays_dropped += 1
                ack_ids.append(int(item["id"]))
                continue
            if message.verified:
                accepted.add(replay_id)
            used[message.id] = (rpk, replay_id if message.verified else b"")
            received.append(message)
        # A message held for `trust` stays at the head of the queue: paging on would
        # fetch it again, so stop until the user decides.
        self.more_waiting = bool(result.get("more")) and all(
            m.error != "identity_changed" for m in received)
        handed: list[ReceivedMessage] = []
        failure: Exception | None = None
        for message in received:
            try:
                if before_ack is not None:
                    await before_ack(message)
            except Exception as exc:  # re-raised after the ack below
                failure = exc
                self.more_waiting = False
                break
            handed.append(message)
        done = [m for m in handed if m.error != "identity_changed"]
        ids, settle = ack_ids + [m.id for m in done], [used[m.id] for m in done]
        if defer_ack and failure is None:
            if ids:
                self._unacked[username] = _PendingAck(device, ids, settle)
            return handed
        try:
            await self._ack(username, session, device, ids, settle)
        except ClientError:
            if failure is None:
                raise
        if failure is not None:
            raise failure
        return handed

    async def flush_acks(self, username: str) -> None:
        """Send the ack a deferred `receive` left for the next fetch (nothing if none)."""
        pending = self._unacked.pop(username, None)
        if pending is None:
            return
        try:
            await self._ack(username, self._session(username), pending.device,
                            pending.ids, pending.used)
        except BaseException:
            self._unacked[username] = pending
            raise

    async def _ack(self, username: str, session: str, device: str, ids: list[int],
                   used: list[tuple[bytes, bytes]]) -> None:
        """Ack `ids`, then settle what they used (`_settle_acked`)."""
        if not ids:
            return
        await self.conn.call("ack", session=session, ids=ids, device=device)
        await self._settle_acked(username, used)

    async def _settle_acked(self, username: str, used: list[tuple[bytes, bytes]]) -> None:
        """Once acked: forget the one-time keys the messages used and remember their
        replay ids (under the profile lock), and top up key packages when running low."""
        with self._edit(username) as profile:
            for rpk, replay_id in used:
                profile.forget_one_time(rpk)
                if replay_id:
                    profile.remember(replay_id, time.time())
            low = len(profile.one_time) < KEY_PACKAGE_LOW_WATER
        if low:
            await self.publish_keys(profile)

    async def _sender_identity(self, name: str, cache: dict[str, bytes | IdentityChanged],
                               own: bool = False) -> bytes:
        """The sender's current device set, proven by the log and matching our pin (for
        our own other devices: the set, checked against the devices we know)."""
        if name not in cache:
            found = await self.lookup(name)
            try:
                if own:
                    await self.check_own_devices(self.profile(name))
                else:
                    self.pins.check(name, found.identity_key)
                cache[name] = found.identity_key
            except IdentityChanged as exc:
                cache[name] = exc
        value = cache[name]
        if isinstance(value, IdentityChanged):
            raise value
        return value

    async def _open(self, profile: Profile, item: dict[str, Any],
                    identities: dict[str, bytes | IdentityChanged],
                    ) -> tuple[ReceivedMessage | None, bytes, bytes]:
        """Authenticate and decrypt one fetched item: (message, one-time key used,
        replay id); the message is None for a replay of one accepted before."""
        # Sealed to this device; an envelope from before devices names the user only.
        label = wrap_label(profile.username, profile.identity_public)
        try:
            try:
                env = parse_envelope(item["payload"], label)
            except DecryptError:
                label = profile.username
                env = parse_envelope(item["payload"], label)
        except DecryptError as exc:
            return _rejected(item, exc.code, exc), b"", b""
        if env.replay_id in profile.seen:
            return None, b"", env.replay_id
        if env.sender != item["from"]:
            why = f"claims sender {env.sender!r} but came from {item['from']!r}"
            return _rejected(item, "forged_sender", why), b"", b""
        if time.time() - env.sent_at_ms / 1000 > REPLAY_WINDOW_S:
            return _rejected(item, "stale", "older than the replay window"), b"", b""
        try:
            identity = await self._sender_identity(env.sender, identities,
                                                   own=env.sender == profile.username)
        except IdentityChanged as exc:
            return _rejected(item, "identity_changed", exc.message), b"", b""
        except KtViolation:
            raise
        except ClientError as exc:  # e.g. the claimed sender has no logged key
            return _rejected(item, "forged_sender", exc.message), b"", b""
        try:
            rpk, content = open_envelope(env, label, profile.identity_public,
                                         profile.private_key_for,
                                         _sending_device(env.sender_identity, identity))
        except DecryptError as exc:  # ForgedSender included: its code says which
            return _rejected(item, exc.code, exc), b"", b""
        if "kt_head" in content:  # authentic, so the head is what the sender saw
            try:  # the head of the sender's domain's log
                await self._kt_for(self._split(env.sender)[1]).check_gossip(
                    content.pop("kt_head"))
            except KtViolation as exc:
                if exc.code != "kt_bad_gossip":
                    raise  # a signed head off our log: the server forked, say it loudly
                # Garbage any sender can write: reject this message, never block the inbox.
                return _rejected(item, "bad_gossip", exc.message), rpk, b""
        return ReceivedMessage(id=int(item["id"]), sender=env.sender,
                               text=str(content.get("text", "")),
                               sent_at=float(item["sent_at"]), content=content), rpk, \
            env.replay_id
