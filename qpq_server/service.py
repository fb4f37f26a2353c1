"""The messaging core's operations: accounts, login, keys, enqueue, fetch and ack.

`Service.ops()` is what the app registers on the transports' `Dispatcher`; `admit` is the
gate the dispatcher runs before every op (address rate limit, access token). What the
service needs from the rest of the server comes in typed by small Protocols (the
delivery notifier, the key-transparency log, the blob index), so a cross-process or
PostgreSQL notifier, or a different log, drops in without touching this module.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from qpq_server.auth.access import AccessTokens
from qpq_server.auth.backoff import LoginBackoff
from qpq_server.auth.opaque import OpaqueServer
from qpq_server.auth.revocation import SessionRevocations
from qpq_server.auth.sessions import SessionSigner
from qpq_server.config import Config
from qpq_server.errors import (
    BadRequest,
    LoginFailed,
    NotFound,
    ProofRequired,
    QuotaExceeded,
    RateLimited,
    ServerBusy,
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
from qpq_server.storage.base import Storage, StoredMessage

__all__ = ["BlobIndex", "KeyLog", "Service"]

log = logging.getLogger("qpq.service")

_MAX_PENDING_LOGINS = 8
_OPAQUE_MSG_MAX = 1024
_KEY_PACKAGE_MAX = 1024
_KEY_PACKAGES_LOW = 5  # below this after a fetch, qpq_key_packages_low_total counts it
_SPK_META = "spk:"  # storage meta key prefix: a user's signed prekey || its signature
_MAX_BLOBS_PER_MESSAGE = 16
_FRESH_LOGIN_S = 120.0


class KeyLog(Protocol):
    """The key-transparency log as the messaging core uses it."""

    async def publish(self, username: str, identity_key: bytes) -> int:
        """Store the key and append its leaf; returns the leaf index."""

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
        self.draining = False
        self.worker: int | None = None  # this process's index among several workers
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
        token, expires = self.signer.issue(pending.username, self.clock())
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
        token, expires = self.signer.issue(user, self.clock())
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
        user = self._session_user(request)
        identity = v.get_optional_bytes(request, "identity_key", max_len=IDENTITY_BYTES,
                                        min_len=IDENTITY_BYTES)
        prekey = v.get_optional_bytes(request, "signed_prekey", max_len=PREKEY_BYTES,
                                      min_len=PREKEY_BYTES)
        prekey_sig = v.get_optional_bytes(request, "signed_prekey_signature",
                                          max_len=SIGNATURE_BYTES, min_len=SIGNATURE_BYTES)
        proof = v.get_optional_bytes(request, "identity_proof", max_len=SIGNATURE_BYTES,
                                     min_len=SIGNATURE_BYTES)
        packages = v.get_bytes_list(request, "key_packages",
                                    max_items=self.config.limits.max_key_packages,
                                    max_len=_KEY_PACKAGE_MAX)
        if (prekey is None) != (prekey_sig is None):
            raise BadRequest("'signed_prekey' and 'signed_prekey_signature' go together")
        account = await self.storage.get_account(user)
        current = account.identity_key if account else None
        if identity is not None and identity != current:
            self._check_identity_proof(user, current, identity, proof, conn)
        effective = identity if identity is not None else current
        if prekey is not None and prekey_sig is not None and (
                effective is None or not verify_signature(
                    effective, prekey_sig, signed_prekey_message(effective, prekey))):
            raise BadRequest("'signed_prekey_signature' is not a signature of the "
                                 "prekey by the account's identity key")
        if identity is not None and identity != current:
            if self.kt is not None:  # logged: clients verify every key they fetch
                await self.kt.publish(user, identity)
            else:
                await self.storage.set_identity_key(user, identity)
            log.info("identity key published", extra={"user": user})
            if current is not None:
                await self._drop_key_packages(user)
        if prekey is not None:
            await self.storage.set_meta(_SPK_META + user, (prekey + (prekey_sig or b"")).hex())
        count = await self.storage.add_key_packages(user, packages) if packages else (
            await self.storage.count_key_packages(user))
        return {"key_packages": count}

    async def _drop_key_packages(self, user: str) -> None:
        """A new identity is a new device: the old one's one-time packages would seal
        messages it alone can open. Rare (key changes), so the generic take loop."""
        while await self.storage.take_key_package(user) is not None:
            pass

    def _check_identity_proof(self, user: str, current: bytes | None, new: bytes,
                              proof: bytes | None, conn: ConnectionState) -> None:
        """Setting an identity needs more than a session (a stolen token must not
        re-key the account): an OPAQUE login for this user on this connection within
        the last _FRESH_LOGIN_S (as for a password change), or a signature by the
        previous identity over the handover."""
        proved = conn.fresh_logins.get(user)
        if proved is not None and self.clock() - proved <= _FRESH_LOGIN_S:
            return
        if current is not None and proof is not None and verify_signature(
                current, proof, identity_change_message(user, current, new)):
            return
        raise ProofRequired(f"a new identity key needs a password login on this connection "
                            f"(within {_FRESH_LOGIN_S:.0f} s) or 'identity_proof' signed by "
                            "the previous identity key")

    async def _get_keys(self, request: dict[str, Any], conn: ConnectionState) -> dict[str, Any]:
        requester = self._session_user(request)
        username = v.get_username(request)
        rl = self.config.rate_limit
        if username != requester:
            self._take(self._key_fetch_limiter, requester, "key_fetch",
                       "too many key fetches from this account; slow down")
        account = await self.storage.get_account(username)
        if account is None:
            raise UnknownUser(f"no user {username!r}")
        if account.identity_key is None:
            raise NotFound(f"user {username!r} has not published keys yet")
        stored = await self.storage.get_meta(_SPK_META + username)
        signed = bytes.fromhex(stored) if stored else b""
        # One requester gets a few of a user's one-time packages, then only the signed
        # prekey: draining someone's packages takes many accounts, and shows in metrics.
        package = None
        if not rl.enabled or self._one_time_limiter.allow(f"{requester}>{username}",
                                                          self.clock()):
            package = await self.storage.take_key_package(username)
            if package is None or (await self.storage.count_key_packages(username)
                                   < _KEY_PACKAGES_LOW):
                self.metrics.key_packages_low_total.inc()
        return {
            "identity_key": account.identity_key,
            "signed_prekey": signed[:PREKEY_BYTES] or None,
            "signed_prekey_signature": signed[PREKEY_BYTES:] or None,
            "key_package": package.key_package if package else None,
            "key_package_id": package.id if package else None,
            "kt": await self._kt_proof(username, account.identity_key),
        }

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
        recipients = v.get_str_list(request, "recipients", max_items=limits.max_recipients)
        if not recipients:
            raise BadRequest("field 'recipients' must not be empty")
        payload = v.get_bytes(request, "payload", max_len=self.config.quic.max_frame_bytes)
        recipients = list(dict.fromkeys(recipients))
        blob_ids = [b.hex() for b in v.get_bytes_list(
            request, "blobs", max_items=_MAX_BLOBS_PER_MESSAGE, max_len=32)
        ] if request.get("blobs") is not None else []
        missing = set(recipients) - await self.storage.existing_users(recipients)
        if missing:
            raise UnknownUser("unknown recipient(s): " + ", ".join(sorted(missing)))
        if blob_ids and (self.blobs is None
                         or any(self.blobs.visible_to(b, sender) is None for b in blob_ids)):
            raise NotFound("the message names a blob this server does not hold")
        if self.draining:
            raise ServerBusy("server is shutting down; retry on reconnect")
        await self._check_enqueue_quotas(sender, recipients, len(payload))
        if blob_ids and self.blobs is not None:  # keep them until each recipient fetched
            await self.blobs.add_refs(blob_ids, recipients)
        ids = await self.storage.enqueue(sender, recipients, payload, self.clock())
        self.metrics.enqueue_total.inc(len(ids))
        self._adjust_queue_depth(len(ids))
        self.notifier.notify(recipients)
        return {"ids": ids}

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

    async def _fetch(self, request: dict[str, Any], conn: ConnectionState) -> dict[str, Any]:
        user = self._session_user(request)
        limits = self.config.limits
        limit = v.get_int(request, "limit", lo=1, hi=limits.max_fetch_batch,
                          default=limits.max_fetch_batch)
        wait_s = v.get_float(request, "wait_s", lo=0.0, hi=limits.max_wait_s, default=0.0)
        self.metrics.fetch_total.inc()
        messages = await self._fetch_page(user, limit)
        deadline = time.monotonic() + wait_s
        # A wake-up is a hint, not a promise (a late or lost notification, a reconnecting
        # notifier waking everyone): park again until the wait is really over.
        while not messages and not self.draining and (left := deadline - time.monotonic()) > 0:
            self.metrics.delivery_waiters.inc()
            try:
                woken = await self.notifier.wait(user, left)
            finally:
                self.metrics.delivery_waiters.dec()
            if not woken:
                break
            messages = await self._fetch_page(user, limit)
        payload_bytes = sum(len(m.payload) for m in messages)
        # More may wait when the page is full by count, or so full by bytes that the next
        # (largest possible) message could not have fitted; a wrong guess costs one fetch.
        more = len(messages) >= limit or (
            payload_bytes > limits.max_response_bytes - self.config.quic.max_frame_bytes)
        return {"messages": [
            {"id": m.id, "from": m.sender, "payload": m.payload, "sent_at": m.sent_at}
            for m in messages
        ], "more": more}

    async def _fetch_page(self, user: str, limit: int) -> list[StoredMessage]:
        """One page, bounded in bytes; one page load per account at a time, so parallel
        fetches of a flooded mailbox cannot multiply what the server holds in memory."""
        async with self._fetch_locks.hold(user):
            return await self.storage.fetch(user, limit, self.config.limits.max_response_bytes)

    async def _ack(self, request: dict[str, Any], conn: ConnectionState) -> dict[str, Any]:
        user = self._session_user(request)
        ids = v.get_int_list(request, "ids", max_items=self.config.limits.max_fetch_batch)
        deleted = await self.storage.ack(user, ids)
        self._adjust_queue_depth(-deleted)
        return {"deleted": deleted}

    def connection_closed(self, conn: ConnectionState) -> None:
        self.metrics.sessions_active.dec(len(conn.logged_in_as))
        conn.logged_in_as.clear()
        conn.pending_logins.clear()
        conn.fresh_logins.clear()


