"""Client-side key-transparency checks: every fetched identity key must be in the
server's signed log *and* be the user's current key in the signed key map, and every
new tree head must extend the last one we pinned.

Pins live in PROFILE_DIR/kt/<server>.json: the server's Ed25519 log key (trusted on
first use) and the last verified signed tree head. A head that is smaller than, or
inconsistent with, the pinned one means the server forked or rewrote its log: that is
raised as a KtViolation, which the CLI reports loudly and never silently re-pins.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from qpq_server.client.errors import ClientError, KtViolation
from qpq_server.client.profile import server_file_name
from qpq_server.fsutil import write_atomic
from qpq_server.kt.keymap import verify_map_inclusion
from qpq_server.kt.merkle import ProofError, leaf_hash, verify_consistency, verify_inclusion
from qpq_server.kt.sth import SignedTreeHead, kt_leaf, verify_tree_head

__all__ = ["KeyVerified", "KtVerifier", "KtViolation"]



class Caller(Protocol):
    server: str

    async def call(self, op: str, timeout: float | None = None,
                   **fields: Any) -> dict[str, Any]: ...


@dataclass(frozen=True)
class KeyVerified:
    username: str
    identity_key: bytes
    leaf_index: int
    head: SignedTreeHead
    previous_size: int | None  # size of the head pinned before this check


class KtVerifier:
    def __init__(self, conn: Caller, profile_dir: Path) -> None:
        self._conn = conn
        server = server_file_name(conn.server)
        self.pin_path = profile_dir / "kt" / f"{server}.json"

    # -- pins --------------------------------------------------------------------------
    def _load_pin(self) -> tuple[bytes, SignedTreeHead | None] | None:
        try:
            data = json.loads(self.pin_path.read_text())
            key = bytes.fromhex(data["public_key"])
            head = data.get("head")
            return key, (None if head is None else SignedTreeHead(
                int(head["size"]), bytes.fromhex(head["root"]), int(head["timestamp_ms"]),
                bytes.fromhex(head["signature"]), bytes.fromhex(head.get("map_root", ""))))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ClientError("kt_pin_unreadable",
                              f"cannot read pinned tree head {self.pin_path}: {exc}") from None

    def _save_pin(self, public_key: bytes, head: SignedTreeHead) -> None:
        self.pin_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        data = {"public_key": public_key.hex(), "head": {
            "size": head.size, "root": head.root.hex(), "timestamp_ms": head.timestamp_ms,
            "signature": head.signature.hex(), "map_root": head.map_root.hex()}}
        write_atomic(self.pin_path, json.dumps(data, indent=1), mode=0o600)

    async def _server_key(self) -> bytes:
        """The pinned log key; on first contact, the server's (trust on first use)."""
        pinned = self._load_pin()
        answer = await self._conn.call("kt_head")
        offered = answer.get("public_key")
        if not isinstance(offered, bytes) or len(offered) != 32:
            raise KtViolation("kt_bad_response", "server sent no valid log public key")
        if pinned is not None and pinned[0] != offered:
            raise KtViolation(
                "kt_key_changed",
                f"the server at {self._conn.server} is not the one this profile knows: its "
                f"key-transparency signing key changed (pinned in {self.pin_path}), so it "
                "is an impostor or was re-initialised (every account and message gone). "
                "Trust it only once its operator confirms a re-initialisation: then "
                f"delete {self.pin_path} and register again (your keys stay)")
        return offered

    async def server_key(self) -> tuple[bytes, bool]:
        """(the server's log key, whether it was pinned before): KtViolation when it
        differs from the pinned one."""
        pinned = self._load_pin()
        return await self._server_key(), pinned is not None

    # -- checks ------------------------------------------------------------------------
    async def check_head(self, head: SignedTreeHead) -> int | None:
        """Verify the signature and consistency with the pinned head; pin the newer one.
        Return the previously pinned size (None on first contact)."""
        pinned = self._load_pin()
        public_key = pinned[0] if pinned else await self._server_key()
        old = pinned[1] if pinned else None
        try:
            verify_tree_head(head, public_key)
        except ProofError as exc:
            raise KtViolation("kt_bad_signature", str(exc)) from None
        if old is not None:
            if head.size < old.size:
                raise KtViolation(
                    "kt_rollback",
                    f"the server's log shrank from {old.size} to {head.size} leaves: "
                    "it truncated or rewrote its key-transparency history")
            proof: list[bytes] = []
            if head.size > old.size:
                answer = await self._conn.call("kt_consistency", first=old.size,
                                               second=head.size)
                proof = list(answer.get("proof") or [])
            try:
                verify_consistency(old.size, head.size, old.root, head.root, proof)
                if head.size == old.size and old.map_root and old.map_root != head.map_root:
                    raise ProofError("two different key maps for the same log")
            except ProofError as exc:
                raise KtViolation(
                    "kt_fork",
                    f"the server's log (size {head.size}) is not an extension of the head "
                    f"pinned at size {old.size} ({exc}): the server forked or rewrote its "
                    "key-transparency history") from None
        if old is None or head.size >= old.size:
            self._save_pin(public_key, head)
        return None if old is None else old.size

    def pinned_key(self) -> bytes | None:
        pinned = self._load_pin()
        return pinned[0] if pinned else None

    def pinned_head(self) -> SignedTreeHead | None:
        pinned = self._load_pin()
        return pinned[1] if pinned else None

    async def check_gossip(self, value: Any) -> None:
        """A head a contact pinned (it travels inside their end-to-end-encrypted
        messages): it must be signed by the same log key and lie on the same history as
        ours, else the server shows different logs to different users."""
        try:
            head = SignedTreeHead.from_wire(value)
        except ProofError:
            raise KtViolation("kt_bad_gossip",
                              "a contact's message carried a malformed tree head") from None
        pinned = self._load_pin()
        old = pinned[1] if pinned else None
        try:  # a head the log key never signed is the sender's garbage, not a fork
            verify_tree_head(head, pinned[0] if pinned else await self._server_key())
        except ProofError:
            raise KtViolation("kt_bad_gossip", "a contact's message carried a tree head "
                              "that the server's log key did not sign") from None
        if pinned is None or old is None or head.size >= old.size:
            try:
                await self.check_head(head)  # signature, consistency; pins it when newer
            except KtViolation:
                raise
            except ClientError as exc:  # the server cannot prove the head it signed
                raise KtViolation(
                    "kt_fork", f"a contact saw a log head of size {head.size} that the "
                    f"server cannot extend yours to ({exc.message}): it shows different "
                    "logs to different users") from None
            return
        try:
            answer = await self._conn.call("kt_consistency", first=head.size,
                                           second=old.size)
            verify_consistency(head.size, old.size, head.root, old.root,
                               list(answer.get("proof") or []))
        except ProofError as exc:
            raise KtViolation(
                "kt_fork",
                f"a contact saw a log head (size {head.size}) that is not part of the log "
                f"you pinned (size {old.size}): {exc}. The server shows different logs "
                "to different users") from None

    async def verify_key(self, username: str, identity_key: bytes,
                         proof: dict[str, Any] | None) -> KeyVerified:
        """Check that (username, identity_key) is in a signed head consistent with the pin,
        and is the user's current key in that head's key map."""
        if not isinstance(proof, dict):
            raise KtViolation("kt_missing_proof",
                              f"server sent {username!r}'s key without a log proof")
        try:
            head = SignedTreeHead.from_wire(proof.get("head"))
            index, path = proof["leaf_index"], proof["audit_path"]
            if not isinstance(index, int) or not isinstance(path, list):
                raise ProofError("malformed inclusion proof")
        except (ProofError, KeyError) as exc:
            raise KtViolation("kt_bad_proof", f"malformed log proof: {exc}") from None
        previous = await self.check_head(head)
        try:
            verify_inclusion(leaf_hash(kt_leaf(username, identity_key)), index, head.size,
                             path, head.root)
        except ProofError as exc:
            raise KtViolation(
                "kt_bad_proof",
                f"{username!r}'s identity key is not proven to be in the signed log "
                f"({exc})") from None
        map_path = proof.get("map_path")
        try:
            if not isinstance(map_path, list):
                raise ProofError("no proof that it is the current key")
            verify_map_inclusion(username, identity_key, map_path, head.map_root)
        except ProofError as exc:
            raise KtViolation(
                "kt_not_current",
                f"{username!r}'s identity key is not proven to be their current key in "
                f"the signed key map ({exc}): the server may be serving an old key") from None
        return KeyVerified(username, identity_key, index, head, previous)

    async def lookup(self, username: str) -> KeyVerified:
        """`kt verify USER`: fetch USER's current key and its proof, verify both."""
        answer = await self._conn.call("kt_lookup", username=username)
        key = answer.get("identity_key")
        if not isinstance(key, bytes):
            raise KtViolation("kt_bad_response", "server sent no identity key")
        return await self.verify_key(username, key, answer)
