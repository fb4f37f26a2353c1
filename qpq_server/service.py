"""The messaging core's operations: accounts, login, keys, enqueue, fetch and ack.

`Service.ops()` is what the app registers on the transports' `Dispatcher`; `admit` is the
gate the dispatcher runs before every op (address rate limit, access token). What the
service needs from the rest of the server comes in typed by small Protocols (the
delivery notifier, the key-transparency log, the blob index), so a cross-process or
PostgreSQL notifier, or a different log, drops in without touching this module.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from qpq_server.auth.access import AccessTokens
from qpq_server.auth.backoff import LoginBackoff
from qpq_server.auth.opaque import OpaqueServer
from qpq_server.auth.revocation import SessionRevocations
from qpq_server.auth.sessions import SessionSigner
from qpq_server.config import Config
from qpq_server.device_registry import LINK_META, SPK_META, DeviceRecord, DeviceRegistry
from qpq_server.devices import (
    LINK_CODE_TTL_S,
    device_id,
    endorsement_message,
    join_device_set,
)
from qpq_server.errors import (
    BadRequest,
    DeviceUnlinked,
    LinkRequired,
    LoginFailed,
    NotFound,
    ProofRequired,
    QuotaExceeded,
    RateLimited,
    ServerBusy,
    TooManyDevices,
    Unauthenticated,
    UnknownUser,
)
from qpq_server.identity import (
    IDENTITY_BYTES,
    PREKEY_BYTES,
    SIGNATURE_BYTES,
    identity_change_message,
    signed_prekey_message,
    verify_signature,
)
from qpq_server.keylocks import KeyedLocks
from qpq_server.metrics import ServerMetrics
from qpq_server.notifier import DeliveryNotifier
from qpq_server.protocol import validate as v
from qpq_server.protocol.dispatch import ConnectionState, Handler
from qpq_server.ratelimit import RateLimiter
from qpq_server.storage.base import Account, Expected, Storage, StoredMessage

if TYPE_CHECKING:
    from qpq_server.federation.hub import Federation

__all__ = ["BlobIndex", "KeyLog", "Service"]

log = logging.getLogger("qpq.service")

_MAX_PENDING_LOGINS = 8
_OPAQUE_MSG_MAX = 1024
_KEY_PACKAGE_MAX = 1024
_KEY_PACKAGES_LOW = 5  # below this after a fetch, qpq_key_packages_low_total counts it
_LINK_TRIES = 5  # wrong link codes before a pending approval is dropped
_DEVICE_ID = re.compile(r"[0-9a-f]{16}")
_MAX_BLOBS_PER_MESSAGE = 16
_FRESH_LOGIN_S = 120.0


class KeyLog(Protocol):
    """The key-transparency log as the messaging core uses it."""

    async def publish(self, username: str, identity_key: bytes,
                      expected: Expected | None = None) -> int:
        """Store the key and append its leaf (with `expected`: only if the stored key is
        still that, else ServerBusy); returns the leaf index."""

    def proof_for(self, username: str, identity_key: bytes) -> dict[str, Any] | None:
        """Inclusion proof of (username, key) in the current head, or None."""

    async def refresh(self) -> None:
        """Catch up with what other processes appended."""


class BlobIndex(Protocol):
    """The blob store as the messaging core uses it: which blobs exist, who may fetch."""

    def visible_to(self, blob_id: str, user: str) -> object | None:
        """The blob, if `user` uploaded it or a message to them names it; else None."""

    async def add_refs(self, blob_ids: Iterable[str], recipients: Iterable[str]) -> None: ...


class Service:
    def __init__(self, *, config: Config, storage: Storage, opaque: OpaqueServer,
                 signer: SessionSigner, access: AccessTokens, metrics: ServerMetrics,
                 notifier: DeliveryNotifier, kt: KeyLog | None = None,
                 blobs: BlobIndex | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.storage = storage
        self.opaque = opaque
        self.signer = signer
        self.access = access
        self.metrics = metrics
        self.notifier = notifier
        self.kt = kt
        self.blobs = blobs
        self.clock = clock
        rl = config.rate_limit
        self._account_limiter = RateLimiter(rl.account_rate_per_s, rl.account_burst)
        self._address_limiter = RateLimiter(rl.address_rate_per_s, rl.address_burst)
        self._key_fetch_limiter = RateLimiter(rl.key_fetch_rate_per_s, rl.key_fetch_burst)
        self._one_time_limiter = RateLimiter(rl.one_time_key_rate_per_s,
                                             rl.one_time_key_burst)
        self._login_ids = itertools.count(1)
        self._backoff = LoginBackoff(rl.login_failures_burst, rl.login_backoff_base_s,
                                     rl.login_backoff_max_s)
        self.revocations = SessionRevocations(storage, clock)
        per_minute = config.limits.enqueue_bytes_per_minute
        self._enqueue_bytes = RateLimiter(per_minute / 60.0, per_minute)
        self._fetch_locks = KeyedLocks()
        self.devices = DeviceRegistry(storage)
        self._device_locks = KeyedLocks()  # one device-set change per account at a time
        self.draining = False
        self.worker: int | None = None  # this process's index among several workers
        self.federation: Federation | None = None  # set when [federation] is enabled
        self._queue_depth = 0

    def ops(self) -> Mapping[str, Handler]:
        return {
            "hello": self._hello,
            "ping": self._ping,
            "register_start": self._register_start,
            "register_finish": self._register_finish,
            "login_start": self._login_start,
            "login_finish": self._login_finish,
            "reregister_start": self._reregister_start,
            "reregister_finish": self._reregister_finish,
            "passwd_start": self._passwd_start,
            "passwd_finish": self._passwd_finish,
            "logout": self._logout,
            "publish_keys": self._publish_keys,
            "get_keys": self._get_keys,
            "enqueue": self._enqueue,
            "fetch": self._fetch,
            "ack": self._ack,
            "devices": self._devices,
            "link_start": self._link_start,
            "device_endorse": self._device_endorse,
            "unlink": self._unlink,
        }

    async def start(self) -> None:
        await self.refresh_queue_depth()
        await self.revocations.load()

    async def refresh_queue_depth(self) -> None:
        """Read the host-wide depth from storage (other workers and nodes change it)."""
        self._queue_depth = await self.storage.queue_depth()
        self.metrics.delivery_queue_depth.set(self._queue_depth)

    def _adjust_queue_depth(self, delta: int) -> None:
        # set(), not inc(): the gauge is "most recent" across worker processes.
        self._queue_depth = max(0, self._queue_depth + delta)
        self.metrics.delivery_queue_depth.set(self._queue_depth)

    # -- gates -------------------------------------------------------------------------
    def admit(self, op: str, conn: ConnectionState) -> None:
        """Run before every op: the address rate limit, then the access token."""
        self._limit_address(conn)
        if op != "hello" and not conn.authenticated:
            raise Unauthenticated("present the access token with 'hello' first")

    def authorize_stream(self, request: dict[str, Any], conn: ConnectionState) -> str:
        """The checks of `handle` for requests a transport streams itself (blobs):
        address rate limit, access token, draining, session. Returns the user."""
        self.admit(str(request.get("op")), conn)
        if self.draining:
            raise ServerBusy("server is shutting down; retry on reconnect")
        return self._session_user(request)

    def _take(self, limiter: RateLimiter, key: str, scope: str, message: str) -> None:
        if self.config.rate_limit.enabled and not limiter.allow(key, self.clock()):
            self.metrics.rate_limit_hit_total.labels(scope=scope).inc()
            raise RateLimited(message)

    def _limit_address(self, conn: ConnectionState) -> None:
        self._take(self._address_limiter, conn.peer, "address",
                   "too many requests from this address; slow down")

    def _limit_account(self, key: str, message: str) -> None:
        self._take(self._account_limiter, key, "account", message)

    def _session_user(self, request: dict[str, Any]) -> str:
        token = v.get_str(request, "session", max_len=512)
        session = self.signer.verify(token, self.clock())
        self.revocations.check(session)
        user = session.username
        self._limit_account("u:" + user, "too many requests for this account; slow down")
        return user

    def _bound_device(self, request: dict[str, Any]) -> str:
        """The device the request's (already checked) session is bound to, or ""."""
        return self.signer.verify(v.get_str(request, "session", max_len=512),
                                  self.clock()).device

    def _require_fresh_login(self, user: str, conn: ConnectionState) -> None:
        """A session alone is not enough to change credentials: a stolen token must not
        become a permanent takeover. The password was proved on this connection just now."""
        proved = conn.fresh_logins.get(user)
        if proved is None or self.clock() - proved > _FRESH_LOGIN_S:
            raise Unauthenticated(f"log in as {user!r} on this connection first (within "
                                  f"{_FRESH_LOGIN_S:.0f} s): changing credentials needs the "
                                  "current password, not only a session")

    # -- handlers ----------------------------------------------------------------------
    async def _hello(self, request: dict[str, Any], conn: ConnectionState) -> dict[str, Any]:
        token = v.get_str(request, "token", max_len=512)
        token_id = self.access.match(token)
        if token_id is None:
            self.metrics.auth_login_failure_total.inc()
            raise Unauthenticated("access token rejected")
        conn.authenticated = True
        conn.token_id = token_id
        answer = {"protocol": "qpq/1", "domain": self.config.server.domain,
                  "max_frame_bytes": self.config.quic.max_frame_bytes}
        if self.worker is not None:  # which worker the kernel put this connection on
            answer["worker"] = self.worker
        if self.federation is not None:  # users here are USER@federation_domain elsewhere
            answer["federation_domain"] = self.federation.domain
        return answer

    async def _ping(self, request: dict[str, Any], conn: ConnectionState) -> dict[str, Any]:
        return {"time": self.clock()}

    async def _register_start(self, request: dict[str, Any],
                              conn: ConnectionState) -> dict[str, Any]:
        username = v.get_username(request)
        message = v.get_bytes(request, "request", max_len=_OPAQUE_MSG_MAX)
        return {"response": self.opaque.registration_start(username, message)}

    async def _register_finish(self, request: dict[str, Any],
                               conn: ConnectionState) -> dict[str, Any]:
        username = v.get_username(request)
        upload = v.get_bytes(request, "upload", max_len=_OPAQUE_MSG_MAX)
        record = self.opaque.registration_finish(upload)
        await self.storage.create_account(username, record, self.opaque.current_version,
                                          self.clock())
        log.info("account registered", extra={"user": username})
        return {}

    async def _login_start(self, request: dict[str, Any],
                           conn: ConnectionState) -> dict[str, Any]:
        username = v.get_username(request)
        message = v.get_bytes(request, "request", max_len=_OPAQUE_MSG_MAX)
        # Per account *and* address: a guesser elsewhere cannot lock the real user out.
        self._backoff.check(username, conn.peer, self.clock())
        self._limit_account(f"login:{username}|{conn.peer}",
                            "too many login attempts for this account; slow down")
        account = await self.storage.get_account(username)
        response, pending = self.opaque.login_start(
            username, message,
            account.password_file if account else None,
            account.setup_version if account else None,
        )
        if len(conn.pending_logins) >= _MAX_PENDING_LOGINS:
            conn.pending_logins.pop(next(iter(conn.pending_logins)))
        login_id = next(self._login_ids)
        conn.pending_logins[login_id] = pending
        return {"response": response, "login_id": login_id}

    async def _login_finish(self, request: dict[str, Any],
                            conn: ConnectionState) -> dict[str, Any]:
        login_id = v.get_int(request, "login_id", lo=0, hi=2**63)
        finalization = v.get_bytes(request, "finalization", max_len=_OPAQUE_MSG_MAX)
        # pop: server login state is single-use, so a replayed finalization fails.
        pending = conn.pending_logins.pop(login_id, None)
        if pending is None:
            self.metrics.auth_login_failure_total.inc()
            raise LoginFailed("no login in progress with this id (expired or replayed)")
        try:
            self.opaque.login_finish(pending, finalization)
        except LoginFailed:
            self.metrics.auth_login_failure_total.inc()
            self._backoff.failed(pending.username, conn.peer, self.clock())
            log.info("login failed", extra={"user": pending.username})
            raise
        self._backoff.succeeded(pending.username, conn.peer)
        conn.fresh_logins[pending.username] = self.clock()
        self.metrics.auth_login_success_total.inc()
        if pending.username not in conn.logged_in_as:
            conn.logged_in_as.add(pending.username)
            self.metrics.sessions_active.inc()
        # A device logs in for itself: its session acts for that device alone.
        device = v.get_str(request, "device", max_len=16) if request.get("device") else ""
        if device and not _DEVICE_ID.fullmatch(device):
            raise BadRequest("field 'device' must be a device id (16 hex digits)")
        token, expires = self.signer.issue(pending.username, self.clock(), device)
        log.info("login succeeded", extra={"user": pending.username})
        return {"session": token, "expires_at": expires,
                "setup_version": pending.setup_version,
                "current_setup_version": self.opaque.current_version}

    async def _reregister_start(self, request: dict[str, Any],
                                conn: ConnectionState) -> dict[str, Any]:
        """After an OPAQUE setup rotation: a user who just logged in under the old setup
        re-registers under the new one (the client knows the password it just used)."""
        user = self._session_user(request)
        await self._require_pending_setup_move(user)
        self._require_fresh_login(user, conn)
        message = v.get_bytes(request, "request", max_len=_OPAQUE_MSG_MAX)
        return {"response": self.opaque.registration_start(user, message)}

    async def _reregister_finish(self, request: dict[str, Any],
                                 conn: ConnectionState) -> dict[str, Any]:
        user = self._session_user(request)
        await self._require_pending_setup_move(user)
        self._require_fresh_login(user, conn)
        upload = v.get_bytes(request, "upload", max_len=_OPAQUE_MSG_MAX)
        record = self.opaque.registration_finish(upload)
        await self.storage.update_password_file(user, record, self.opaque.current_version)
        log.info("account moved to the current OPAQUE setup",
                 extra={"user": user, "setup_version": self.opaque.current_version})
        return {"setup_version": self.opaque.current_version}

    async def _require_pending_setup_move(self, user: str) -> None:
        account = await self.storage.get_account(user)
        if account is None or account.setup_version >= self.opaque.current_version:
            raise BadRequest("this account has no OPAQUE setup move pending; "
                             "use passwd_start to change a password")

    async def _passwd_start(self, request: dict[str, Any],
                            conn: ConnectionState) -> dict[str, Any]:
        """Change the password: needs a session and a password proof on this
        connection moments before (the client logs in with the old password first)."""
        user = self._session_user(request)
        self._require_fresh_login(user, conn)
        message = v.get_bytes(request, "request", max_len=_OPAQUE_MSG_MAX)
        return {"response": self.opaque.registration_start(user, message)}

    async def _passwd_finish(self, request: dict[str, Any],
                             conn: ConnectionState) -> dict[str, Any]:
        user = self._session_user(request)
        self._require_fresh_login(user, conn)
        upload = v.get_bytes(request, "upload", max_len=_OPAQUE_MSG_MAX)
        record = self.opaque.registration_finish(upload)
        await self.storage.update_password_file(user, record, self.opaque.current_version)
        # Every other session of the account dies with the old password.
        await self.revocations.revoke(user)
        conn.fresh_logins.pop(user, None)
        token, expires = self.signer.issue(user, self.clock(), self._bound_device(request))
        log.info("password changed; the account's other sessions are revoked",
                 extra={"user": user})
        return {"session": token, "expires_at": expires}

    async def _logout(self, request: dict[str, Any], conn: ConnectionState) -> dict[str, Any]:
        """Revoke every session of the account (all devices): sessions are bearer
        tokens, so ending one means ending what was issued until now."""
        user = self._session_user(request)
        await self.revocations.revoke(user)
        conn.fresh_logins.pop(user, None)
        if user in conn.logged_in_as:
            conn.logged_in_as.discard(user)
            self.metrics.sessions_active.dec()
        log.info("logged out; the account's sessions are revoked", extra={"user": user})
        return {"revoked": True}

    async def _publish_keys(self, request: dict[str, Any],
                            conn: ConnectionState) -> dict[str, Any]:
        """Publish this device's identity (adding the device to the account), its signed
        prekey and one-time packages. The device is named by `identity_key` or `device`;
        a client from before devices existed names neither and means the first device."""
        user = self._session_user(request)
        identity = v.get_optional_bytes(request, "identity_key", max_len=IDENTITY_BYTES,
                                        min_len=IDENTITY_BYTES)
        prekey = v.get_optional_bytes(request, "signed_prekey", max_len=PREKEY_BYTES,
                                      min_len=PREKEY_BYTES)
        prekey_sig = v.get_optional_bytes(request, "signed_prekey_signature",
                                          max_len=SIGNATURE_BYTES, min_len=SIGNATURE_BYTES)
        packages = v.get_bytes_list(request, "key_packages",
                                    max_items=self.config.limits.max_key_packages,
                                    max_len=_KEY_PACKAGE_MAX)
        if (prekey is None) != (prekey_sig is None):
            raise BadRequest("'signed_prekey' and 'signed_prekey_signature' go together")
        async with self._device_locks.hold(user):
            account, devices = await self._account_devices(user)
            if devices and not await self.devices.recorded(user):
                await self._migrate_single_device(user, devices)
            if identity is not None and device_id(identity) not in devices:
                devices = await self._add_device(user, account, devices, identity,
                                                 request, conn)
            record = self._device_of(user, devices, request, identity)
        if prekey is not None and prekey_sig is not None and not verify_signature(
                record.identity, prekey_sig, signed_prekey_message(record.identity, prekey)):
            raise BadRequest("'signed_prekey_signature' is not a signature of the "
                             "prekey by the device's identity key")
        if prekey is not None:
            await self.storage.set_meta(SPK_META + record.mailbox,
                                        (prekey + (prekey_sig or b"")).hex())
        tag = record.tag
        count = await self.storage.add_key_packages(user, [tag + p for p in packages]) \
            if packages else await self.storage.count_key_packages(user, tag)
        return {"key_packages": count, "device": record.id, "devices": len(devices)}

    async def _account_devices(self, user: str) -> tuple[Account, dict[str, DeviceRecord]]:
        account = await self.storage.get_account(user)
        if account is None:
            raise UnknownUser(f"no user {user!r}")
        return account, await self.devices.load(account)

    def _device_of(self, user: str, devices: dict[str, DeviceRecord],
                   request: dict[str, Any], identity: bytes | None = None) -> DeviceRecord:
        """The requesting device: `device` (its id), else the identity it publishes,
        else the device the session is bound to, else (a client from before devices)
        the account's first device. A bound session acts for its own device only."""
        bound = self._bound_device(request)
        wanted = request.get("device")
        if wanted is not None:
            did = v.get_str(request, "device", max_len=64)
        elif identity is not None:
            did = device_id(identity)
        elif bound:
            did = bound
        else:
            first = [r for r in devices.values() if r.mailbox == user]
            if not first:
                raise DeviceUnlinked(f"name the device ('device') for {user!r}")
            return first[0]
        record = devices.get(did)
        # (a device that rotated its key keeps the session of its old key)
        if bound and did != bound and not (
                record and record.handover and device_id(record.handover[:64]) == bound):
            raise Unauthenticated(f"this session belongs to device {bound}, not {did}")
        if record is None:
            raise DeviceUnlinked(f"device {did} is not one of {user!r}'s current devices "
                                 "(it was unlinked, or never added)")
        return record

    async def _add_device(self, user: str, account: Account,
                          devices: dict[str, DeviceRecord], identity: bytes,
                          request: dict[str, Any],
                          conn: ConnectionState) -> dict[str, DeviceRecord]:
        """A new device needs the password proved on this connection and, when the
        account has a device already, a link code one of them issued; or (key rotation
        of one device) a handover signed by the identity it replaces."""
        proof = v.get_optional_bytes(request, "identity_proof", max_len=SIGNATURE_BYTES,
                                     min_len=SIGNATURE_BYTES)
        link_mac = v.get_optional_bytes(request, "link_mac", max_len=32, min_len=32)
        replaced = next((r for r in devices.values() if proof is not None and verify_signature(
            r.identity, proof, identity_change_message(user, r.identity, identity))), None)
        if replaced is None:
            self._require_password_proof(user, conn)
            if devices:
                await self._consume_link(user, v.get_optional_bytes(
                    request, "link_code", max_len=32, min_len=32))
        limit = self.config.limits.max_devices
        if replaced is None and len(devices) >= limit:
            raise TooManyDevices(f"{user!r} has {len(devices)} devices, the most allowed "
                                 f"({limit}); unlink one first")
        did = device_id(identity)
        mailbox = replaced.mailbox if replaced else (
            f"{user}#{did}" if any(r.mailbox == user for r in devices.values()) else user)
        new = {k: r for k, r in devices.items() if r is not replaced}
        new[did] = DeviceRecord(did, identity, self.clock(), mailbox, link_mac or b"",
                                handover=replaced.identity + (proof or b"") if replaced
                                else b"")
        await self._publish_device_set(user, new, account.identity_key)
        if replaced is not None:
            await self._drop_key_packages(user, replaced.tag)
        elif not devices:
            await self._drop_key_packages(user, b"")  # untagged: from before devices
        log.info("device added", extra={"user": user, "device": did,
                                        "devices": len(new)})
        return new

    async def _migrate_single_device(self, user: str,
                                     devices: dict[str, DeviceRecord]) -> None:
        """An account from before devices: its one device's untagged one-time packages
        get its tag (senders still use them), then its record is written, once."""
        (record,) = devices.values()
        legacy: list[bytes] = []
        while (package := await self.storage.take_key_package(user)) is not None:
            legacy.append(package.key_package)
        if legacy:
            await self.storage.add_key_packages(user, [record.tag + p for p in legacy])
        await self.devices.save(user, devices)
        log.info("account moved to device records", extra={"user": user,
                                                           "packages": len(legacy)})

    async def _publish_device_set(self, user: str, devices: dict[str, DeviceRecord],
                                  read: bytes | None) -> None:
        """Log the new set first (clients check it), then the records that annotate it:
        `load` reconciles a crash between the two from the logged set. `read` is the set
        the change started from: storage writes the new set only if it is still that (a
        compare-and-set), so another process (worker, node) that changed it since makes
        this change retry (server_busy) rather than drop the other's device."""
        value = join_device_set(r.identity for r in devices.values())
        if self.kt is not None:  # logged: clients verify every key set they fetch
            await self.kt.publish(user, value, expected=Expected(read))
        else:
            await self.storage.set_identity_key(user, value, expected=Expected(read))
        await self.devices.save(user, devices)

    async def _consume_link(self, user: str, verifier: bytes | None) -> None:
        """One-use approval from an existing device; a few wrong codes drop it."""
        raw = await self.storage.get_meta(LINK_META + user)
        pending = json.loads(raw) if raw else None
        if pending is not None and float(pending["expires_at"]) < self.clock():
            pending = None
        if pending is None:
            raise LinkRequired(f"{user!r} already has a device: run `qpq-client link "
                               f"{user}` on it and log in here with the code it prints "
                               "(--link-code)")
        if verifier is None or hashlib.sha256(verifier).hexdigest() != pending["verifier"]:
            tries = int(pending["tries"]) - 1
            await self.storage.set_meta(LINK_META + user, "" if tries <= 0 else json.dumps(
                {**pending, "tries": tries}))
            raise LinkRequired("wrong or missing link code" + (
                "; the approval is used up, run `link` again" if tries <= 0 else ""))
        await self.storage.set_meta(LINK_META + user, "")

    async def _drop_key_packages(self, user: str, tag: bytes) -> None:
        """A replaced or removed device's one-time packages would seal messages nobody
        can open. Rare (device changes), so the generic take loop."""
        while await self.storage.take_key_package(user, tag) is not None:
            pass

    def _require_password_proof(self, user: str, conn: ConnectionState) -> None:
        proved = conn.fresh_logins.get(user)
        if proved is None or self.clock() - proved > _FRESH_LOGIN_S:
            raise ProofRequired(
                f"a new device needs a password login on this connection (within "
                f"{_FRESH_LOGIN_S:.0f} s) or 'identity_proof' signed by the identity it "
                "replaces")

    # -- devices -----------------------------------------------------------------------
    async def _devices(self, request: dict[str, Any], conn: ConnectionState) -> dict[str, Any]:
        """The account's devices, with the log proof of the set (clients check both)."""
        user = self._session_user(request)
        account, devices = await self._account_devices(user)
        return {"devices": [r.to_wire() for r in devices.values()],
                "identity_key": account.identity_key,
                "kt": (await self._kt_proof(user, account.identity_key)
                       if account.identity_key else None)}

    async def _link_start(self, request: dict[str, Any],
                          conn: ConnectionState) -> dict[str, Any]:
        """An existing device approves one new device: it stores the hash of a verifier
        derived from the code it shows the user (the code itself never reaches us)."""
        user = self._session_user(request)
        self._require_fresh_login(user, conn)
        verifier_hash = v.get_bytes(request, "verifier_hash", max_len=32, min_len=32)
        _, devices = await self._account_devices(user)
        approver = self._device_of(user, devices, request)
        if len(devices) >= self.config.limits.max_devices:
            raise TooManyDevices(f"{user!r} already has the most devices allowed "
                                 f"({self.config.limits.max_devices}); unlink one first")
        await self.storage.set_meta(LINK_META + user, json.dumps({
            "verifier": verifier_hash.hex(),
            "expires_at": self.clock() + LINK_CODE_TTL_S, "tries": _LINK_TRIES,
            "by": approver.id}))
        return {"expires_at": self.clock() + LINK_CODE_TTL_S}

    async def _device_endorse(self, request: dict[str, Any],
                              conn: ConnectionState) -> dict[str, Any]:
        """Store an existing device's signature vouching for a device it linked."""
        user = self._session_user(request)
        target = v.get_str(request, "target", max_len=64)
        signature = v.get_bytes(request, "signature", max_len=SIGNATURE_BYTES,
                                min_len=SIGNATURE_BYTES)
        async with self._device_locks.hold(user):
            _, devices = await self._account_devices(user)
            endorser = self._device_of(user, devices, request)
            record = devices.get(target)
            if record is None:
                raise DeviceUnlinked(f"device {target} is not one of {user!r}'s devices")
            if not verify_signature(endorser.identity, signature, endorsement_message(
                    user, endorser.identity, record.identity)):
                raise BadRequest("'signature' is not the device's endorsement of the target")
            devices[target] = DeviceRegistry.endorse(record, endorser.id, signature)
            await self.devices.save(user, devices)
        return {"device": target}

    async def _unlink(self, request: dict[str, Any], conn: ConnectionState) -> dict[str, Any]:
        """Remove one device: the log records the smaller set (senders stop sealing to
        it), its queue and packages go, and its sessions end (with any account-wide
        ones); the caller gets a fresh session."""
        user = self._session_user(request)
        self._require_fresh_login(user, conn)
        target = v.get_str(request, "target", max_len=64)
        async with self._device_locks.hold(user):
            account, devices = await self._account_devices(user)
            record = devices.get(target)
            if record is None:
                raise DeviceUnlinked(f"device {target} is not one of {user!r}'s devices")
            if len(devices) == 1:
                raise BadRequest(f"device {target} is {user!r}'s only device; it cannot "
                                 "be unlinked")
            del devices[target]
            await self._publish_device_set(user, devices, account.identity_key)
        await self._drop_key_packages(user, record.tag)
        await self._drain(record.mailbox)
        await self.storage.set_meta(SPK_META + record.mailbox, "")
        # Its sessions end, and the account-wide ones (clients from before devices):
        # the other devices' own sessions go on.
        await self.revocations.revoke(f"{user}#{target}")
        await self.revocations.revoke(f"{user}#")
        conn.fresh_logins.pop(user, None)
        self.notifier.notify([record.mailbox])  # a parked fetch of it returns now
        token, expires = self.signer.issue(user, self.clock(), self._bound_device(request))
        log.info("device unlinked; its sessions are revoked",
                 extra={"user": user, "device": target})
        return {"device": target, "session": token, "expires_at": expires,
                "devices": len(devices)}

    async def _drain(self, mailbox: str) -> None:
        limit = self.config.limits.max_fetch_batch
        while page := await self.storage.fetch(mailbox, limit):
            self._adjust_queue_depth(-await self.storage.ack(mailbox, [m.id for m in page]))

    async def _get_keys(self, request: dict[str, Any], conn: ConnectionState) -> dict[str, Any]:
        """Every current device's bundle (identity, signed prekey, maybe a one-time
        package) and the log proof of the account's device set. The top-level fields
        repeat the first device's bundle for clients from before devices."""
        requester = self._session_user(request)
        if self.federation is not None:  # USER@DOMAIN: another domain's keys, via its server
            from qpq_server.federation.address import split_address

            user, domain = split_address(v.get_str(request, "username", max_len=318),
                                         self.federation.domain)
            if domain is not None:
                self._take(self._key_fetch_limiter, requester, "key_fetch",
                           "too many key fetches from this account; slow down")
                return await self.federation.remote_keys(requester, user, domain)
            request = {**request, "username": user}
        return await self.keys_for(requester, v.get_username(request))

    async def keys_for(self, requester: str, username: str) -> dict[str, Any]:
        """A local user's keys (every device's bundle) for `requester`: a local user,
        or USER@DOMAIN asking through a federation peer."""
        if username != requester:
            self._take(self._key_fetch_limiter, requester, "key_fetch",
                       "too many key fetches from this account; slow down")
        account = await self.storage.get_account(username)
        if account is None:
            raise UnknownUser(f"no user {username!r}")
        if account.identity_key is None:
            raise NotFound(f"user {username!r} has not published keys yet")
        rl = self.config.rate_limit
        # One requester gets a few of a user's one-time packages, then only the signed
        # prekeys: draining someone's packages takes many accounts, and shows in metrics.
        give_packages = not rl.enabled or self._one_time_limiter.allow(
            f"{requester}>{username}", self.clock())
        bundles = [await self._device_bundle(username, record, give_packages)
                   for record in (await self.devices.load(account)).values()]
        first = bundles[0]
        return {
            "identity_key": account.identity_key,
            "signed_prekey": first["signed_prekey"],
            "signed_prekey_signature": first["signed_prekey_signature"],
            "key_package": first["key_package"],
            "key_package_id": first["key_package_id"],
            "devices": bundles,
            "kt": await self._kt_proof(username, account.identity_key),
        }

    async def _device_bundle(self, username: str, record: DeviceRecord,
                             give_package: bool) -> dict[str, Any]:
        stored = await self.storage.get_meta(SPK_META + record.mailbox)
        signed = bytes.fromhex(stored) if stored else b""
        package = None
        if give_package:
            package = await self.storage.take_key_package(username, record.tag)
            if package is None or (await self.storage.count_key_packages(username, record.tag)
                                   < _KEY_PACKAGES_LOW):
                self.metrics.key_packages_low_total.inc()
        return {"device": record.id, "identity_key": record.identity,
                "signed_prekey": signed[:PREKEY_BYTES] or None,
                "signed_prekey_signature": signed[PREKEY_BYTES:] or None,
                "key_package": package.key_package[len(record.tag):] if package else None,
                "key_package_id": package.id if package else None}

    async def _kt_proof(self, username: str, identity_key: bytes) -> dict[str, Any] | None:
        if self.kt is None:
            return None
        await self.kt.refresh()
        return self.kt.proof_for(username, identity_key)

    async def _enqueue(self, request: dict[str, Any], conn: ConnectionState) -> dict[str, Any]:
        sender = self._session_user(request)
        limits = self.config.limits
        raw_recipients = request.get("recipients")
        if isinstance(raw_recipients, list) and len(raw_recipients) > limits.max_recipients:
            self.metrics.quota_refused_total.labels(kind="recipients").inc()
        recipients = v.get_str_list(request, "recipients", max_items=limits.max_recipients,
                                    addresses=self.federation is not None)
        if not recipients:
            raise BadRequest("field 'recipients' must not be empty")
        payload = v.get_bytes(request, "payload", max_len=self.config.quic.max_frame_bytes)
        recipients = list(dict.fromkeys(recipients))
        remote: list[tuple[str, str]] = []
        if self.federation is not None:  # USER@DOMAIN recipients go to that peer's outbox
            recipients, remote = self.federation.split(recipients)
        blob_ids = [b.hex() for b in v.get_bytes_list(
            request, "blobs", max_items=_MAX_BLOBS_PER_MESSAGE, max_len=32)
        ] if request.get("blobs") is not None else []
        if blob_ids and remote:
            raise BadRequest("attachments cannot be relayed to other domains yet; send "
                             "them to local recipients only")
        # Each recipient's account and devices in one read (the devices are needed
        # below, so this also answers "does it exist" without a read of its own).
        loaded = {name: await self.devices.load_user(name) for name in recipients}
        missing = {name for name, (account, _) in loaded.items() if account is None}
        if missing:
            raise UnknownUser("unknown recipient(s): " + ", ".join(sorted(missing)))
        if blob_ids and (self.blobs is None
                         or any(self.blobs.visible_to(b, sender) is None for b in blob_ids)):
            raise NotFound("the message names a blob this server does not hold")
        if self.draining:
            raise ServerBusy("server is shutting down; retry on reconnect")
        mailboxes, refs = self._mailboxes(sender, {n: d for n, (_, d) in loaded.items()},
                                          request)
        await self._check_enqueue_quotas(sender, mailboxes + [f"{u}@{d}" for u, d in remote],
                                         len(payload))
        if remote and self.federation is not None:
            await self.federation.check_outbox(remote, len(payload))
        if blob_ids and self.blobs is not None:  # keep them until each device fetched
            await self.blobs.add_refs(blob_ids, refs)
        now = self.clock()
        ids = await self.storage.enqueue(sender, mailboxes, payload, now) if mailboxes else []
        if remote and self.federation is not None:
            ids += await self.federation.queue(sender, remote, payload, now)
        self.metrics.enqueue_total.inc(len(ids))
        self._adjust_queue_depth(len(ids))
        self.notifier.notify(mailboxes)
        return {"ids": ids}

    def _mailboxes(self, sender: str, recipients: dict[str, dict[str, DeviceRecord]],
                   request: dict[str, Any]) -> tuple[list[str], list[str]]:
        """One copy per current device of each recipient (name -> its devices); the
        sender among them means the sender's *other* devices (the sending one,
        `device`, already has it). Returns the queues and the blob references
        (USER/DEVICE) of those devices."""
        own = self._bound_device(request) or (
            v.get_str(request, "device", max_len=64) if request.get("device") else None)
        mailboxes: list[str] = []
        refs: list[str] = []
        for name, devices in recipients.items():
            if not devices:  # no keys published yet: the account's own queue
                mailboxes.append(name)
                refs.append(name)
                continue
            chosen = [r for r in devices.values() if not (name == sender and r.id == own)]
            mailboxes += [r.mailbox for r in chosen]
            refs += [f"{name}/{r.id}" for r in chosen]
        return list(dict.fromkeys(mailboxes)), list(dict.fromkeys(refs))

    async def _check_enqueue_quotas(self, sender: str, recipients: list[str],
                                    size: int) -> None:
        """Every stored copy counts: against the sender's bytes per minute and each
        recipient's mailbox. (Concurrent enqueues may overshoot a mailbox by one batch.)"""
        limits = self.config.limits
        copies = size * len(recipients)
        if not self._enqueue_bytes.allow("u:" + sender, self.clock(), float(copies)):
            self.metrics.quota_refused_total.labels(kind="enqueue_bytes").inc()
            raise QuotaExceeded(
                f"this account may enqueue {limits.enqueue_bytes_per_minute} bytes per minute "
                f"(every recipient's copy counts; this request is {copies}); slow down")
        usage = await self.storage.mailbox_bytes(recipients)
        full = sorted(r for r in recipients if usage.get(r, 0) + size > limits.mailbox_max_bytes)
        if full:
            self.metrics.quota_refused_total.labels(kind="mailbox_bytes").inc()
            raise QuotaExceeded("mailbox full for: " + ", ".join(full[:10]))

    # -- what federation peers' relays use (federation.inbound.Delivery) ----------------
    async def relay_mailboxes(self, recipient: str) -> list[str]:
        """The queues a relayed message to `recipient` goes to: one per device."""
        _, devices = await self.devices.load_user(recipient)
        # no keys published yet: the account's own queue (as a local enqueue does)
        return list(dict.fromkeys(r.mailbox for r in devices.values())) or [recipient]

    async def check_relay_quotas(self, sender: str, mailboxes: list[str], size: int) -> None:
        """A remote sender is quota-checked like a local one (bytes per minute, each
        device's mailbox)."""
        await self._check_enqueue_quotas(sender, mailboxes, size)

    def relayed(self, mailboxes: list[str]) -> None:
        self.metrics.enqueue_total.inc(len(mailboxes))
        self._adjust_queue_depth(len(mailboxes))
        self.notifier.notify(mailboxes)

    def relays_removed(self, count: int) -> None:
        """Entries left a federation outbox (relayed, rejected or expired)."""
        self._adjust_queue_depth(-count)

    async def _fetch(self, request: dict[str, Any], conn: ConnectionState) -> dict[str, Any]:
        user = self._session_user(request)
        limits = self.config.limits
        limit = v.get_int(request, "limit", lo=1, hi=limits.max_fetch_batch,
                          default=limits.max_fetch_batch)
        wait_s = v.get_float(request, "wait_s", lo=0.0, hi=limits.max_wait_s, default=0.0)
        # Acks carried by this fetch (what the client showed since its last one): one
        # request fewer per delivered page. Validated with the rest, before any effect.
        ack_ids = (v.get_int_list(request, "ack", max_items=limits.max_fetch_batch)
                   if request.get("ack") is not None else [])
        self.metrics.fetch_total.inc()
        mailbox = await self._own_mailbox(user, request)
        # Committed before the read, so the page never holds a message this fetch acked.
        acked = await self._delete_acked(mailbox, ack_ids)
        messages = await self._fetch_page(mailbox, limit)
        deadline = time.monotonic() + wait_s
        # A wake-up is a hint, not a promise (a late or lost notification, a reconnecting
        # notifier waking everyone): park again until the wait is really over.
        while not messages and not self.draining and (left := deadline - time.monotonic()) > 0:
            self.metrics.delivery_waiters.inc()
            try:
                woken = await self.notifier.wait(mailbox, left)
            finally:
                self.metrics.delivery_waiters.dec()
            if not woken:
                break
            mailbox = await self._own_mailbox(user, request)  # unlinked meanwhile?
            messages = await self._fetch_page(mailbox, limit)
        payload_bytes = sum(len(m.payload) for m in messages)
        # More may wait when the page is full by count, or so full by bytes that the next
        # (largest possible) message could not have fitted; a wrong guess costs one fetch.
        more = len(messages) >= limit or (
            payload_bytes > limits.max_response_bytes - self.config.quic.max_frame_bytes)
        return {"messages": [
            {"id": m.id, "from": m.sender, "payload": m.payload, "sent_at": m.sent_at}
            for m in messages
        ], "more": more, "acked": acked}

    async def _own_mailbox(self, user: str, request: dict[str, Any]) -> str:
        """The requesting device's queue: each device fetches and acks its own copies,
        so acking on one never deletes another's."""
        _, devices = await self.devices.load_user(user)
        if not devices and request.get("device") is None:
            return user
        return self._device_of(user, devices, request).mailbox

    async def _fetch_page(self, user: str, limit: int) -> list[StoredMessage]:
        """One page, bounded in bytes; one page load per account at a time, so parallel
        fetches of a flooded mailbox cannot multiply what the server holds in memory."""
        async with self._fetch_locks.hold(user):
            return await self.storage.fetch(user, limit, self.config.limits.max_response_bytes)

    async def _ack(self, request: dict[str, Any], conn: ConnectionState) -> dict[str, Any]:
        user = self._session_user(request)
        ids = v.get_int_list(request, "ids", max_items=self.config.limits.max_fetch_batch)
        return {"deleted": await self._delete_acked(await self._own_mailbox(user, request), ids)}

    async def _delete_acked(self, mailbox: str, ids: list[int]) -> int:
        """Delete delivered messages of `mailbox` (the caller's own queue: ids of any
        other queue match nothing, so they are ignored); return how many went."""
        if not ids:
            return 0
        deleted = await self.storage.ack(mailbox, ids)
        self._adjust_queue_depth(-deleted)
        return deleted

    def connection_closed(self, conn: ConnectionState) -> None:
        self.metrics.sessions_active.dec(len(conn.logged_in_as))
        conn.logged_in_as.clear()
        conn.pending_logins.clear()
        conn.fresh_logins.clear()


