"""High-level client operations: register, login, send, receive (decrypting locally)."""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import opaque_ke_py as opaque

from qpq_server.client.connection import ClientError, QpqConnection
from qpq_server.client.e2e import DecryptError, RecipientKey, open_envelope, seal
from qpq_server.client.files import FileDecryptError, decrypt_stream, encrypt_stream
from qpq_server.client.kt import KtVerifier
from qpq_server.client.profile import Profile

__all__ = ["QpqClient", "ReceivedMessage"]

KEY_PACKAGE_TARGET = 20
KEY_PACKAGE_LOW_WATER = 10


@dataclass(frozen=True)
class ReceivedMessage:
    id: int
    sender: str
    text: str
    sent_at: float
    content: dict[str, Any]


def _safe_name(name: str) -> str:
    """The sender chooses the name: keep only a plain file name."""
    base = Path(name.replace("\\", "/")).name.lstrip(".")
    return base or "attachment"


def _free_name(directory: Path, name: str) -> Path:
    target = directory / name
    stem, suffix, n = target.stem, target.suffix, 1
    while target.exists():
        target = directory / f"{stem} ({n}){suffix}"
        n += 1
    return target


class QpqClient:
    def __init__(self, connection: QpqConnection, profile_dir: Path) -> None:
        self.conn = connection
        self.profile_dir = profile_dir
        self._profiles: dict[str, Profile] = {}
        self.kt = KtVerifier(connection, profile_dir)
        self.more_waiting = False  # the last fetch said more messages wait (page by bytes)

    def profile(self, username: str) -> Profile:
        if username not in self._profiles:
            self._profiles[username] = Profile.load_or_create(self.profile_dir, username)
        return self._profiles[username]

    async def register(self, username: str, password: str) -> None:
        start = opaque.client_registration_start(password.encode())
        response = await self.conn.call("register_start", username=username,
                                        request=start.get_message())
        finish = opaque.client_registration_finish(password.encode(), start.get_state(),
                                                   response["response"])
        await self.conn.call("register_finish", username=username, upload=finish.get_message())
        await self.login(username, password)

    async def login(self, username: str, password: str) -> Profile:
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
        result = await self.conn.call("login_finish", login_id=response["login_id"],
                                      finalization=finish.get_message())
        profile = self.profile(username)
        profile.session, profile.session_expires = result["session"], result["expires_at"]
        profile.save()
        if result.get("setup_version", 0) < result.get("current_setup_version", 0):
            await self._reregister(profile.session, password)
        await self.publish_keys(profile)
        return profile

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
        profile = self.profile(username)
        profile.session, profile.session_expires = result["session"], result["expires_at"]
        profile.save()

    async def logout(self, username: str) -> None:
        """End every session of the account (on all devices) and forget ours."""
        await self.conn.call("logout", session=self._session(username))
        profile = self.profile(username)
        profile.session, profile.session_expires = None, 0.0
        profile.save()

    def has_session(self, username: str) -> bool:
        profile = self.profile(username)
        return bool(profile.session) and profile.session_expires > time.time() + 30

    def _session(self, username: str) -> str:
        profile = self.profile(username)
        if not profile.session:
            raise ClientError("invalid_session", f"{username} is not logged in")
        return profile.session

    async def publish_keys(self, profile: Profile) -> int:
        session = self._session(profile.username)
        result = await self.conn.call(
            "publish_keys", session=session,
            identity_key=None if profile.published_identity else profile.identity_public,
            key_packages=[])
        count = int(result["key_packages"])
        profile.published_identity = True
        if count < KEY_PACKAGE_LOW_WATER:
            fresh = profile.new_one_time_keys(KEY_PACKAGE_TARGET - count)
            profile.save()  # private halves on disk before the public halves are published
            result = await self.conn.call("publish_keys", session=session, key_packages=fresh)
            count = int(result["key_packages"])
        profile.save()
        return count

    async def send(self, sender: str, recipients: Sequence[str], content: dict[str, Any],
                   blobs: Sequence[bytes] = ()) -> list[int]:
        session = self._session(sender)
        keys = []
        for name in dict.fromkeys(recipients):
            bundle = await self.conn.call("get_keys", session=session, username=name)
            # Never encrypt to a key the server's signed, append-only log does not show.
            await self.kt.verify_key(name, bytes(bundle["identity_key"]), bundle.get("kt"))
            package = bundle["key_package"]
            keys.append(RecipientKey(name, bytes(bundle["identity_key"]),
                                     bytes(package) if package else None))
        envelope = seal(content, sender, keys)
        extra: dict[str, Any] = {"blobs": list(blobs)} if blobs else {}
        result = await self.conn.call("enqueue", session=session, recipients=list(recipients),
                                      payload=envelope, **extra)
        return list(result["ids"])

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
        if not isinstance(blob, bytes) or not isinstance(key, bytes):
            raise ClientError("bad_message", "file message without blob id or key")
        out_dir.mkdir(parents=True, exist_ok=True)
        target = _free_name(out_dir, _safe_name(str(content.get("name", ""))))
        with tempfile.TemporaryFile(dir=out_dir) as sealed:
            await self.conn.get_blob(self._session(username), blob, sealed.write)
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
                      ) -> list[ReceivedMessage]:
        """Fetch, decrypt, then ack; undecryptable messages are reported and acked too.
        `before_ack` runs on each message first (saving attachments): if it raises,
        nothing is acked and the messages stay queued."""
        session = self._session(username)
        profile = self.profile(username)
        timeout = self.conn.timeout + wait_s
        result = await self.conn.call("fetch", timeout=timeout, session=session,
                                      wait_s=wait_s, limit=limit)
        self.more_waiting = bool(result.get("more"))
        received: list[ReceivedMessage] = []
        used_keys: list[bytes] = []
        for item in result["messages"]:
            try:
                sender, rpk, content = open_envelope(item["payload"], username,
                                                     profile.private_key_for)
            except DecryptError as exc:
                content = {"type": "error", "text": f"[undecryptable message: {exc}]"}
                sender, rpk = item["from"], b""
            if sender != item["from"]:
                content = {"type": "error",
                           "text": f"[message claims sender {sender!r} but came from "
                                   f"{item['from']!r}; dropped]"}
                sender = item["from"]
            used_keys.append(rpk)
            received.append(ReceivedMessage(
                id=int(item["id"]), sender=sender, text=str(content.get("text", "")),
                sent_at=float(item["sent_at"]), content=content))
        if before_ack is not None:
            for message in received:
                await before_ack(message)
        if received:
            await self.conn.call("ack", session=session, ids=[m.id for m in received])
            for rpk in used_keys:
                profile.forget_one_time(rpk)
            profile.save()
            if len(profile.one_time) < KEY_PACKAGE_LOW_WATER:
                await self.publish_keys(profile)
        return received
