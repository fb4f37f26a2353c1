"""Key transparency: RFC 9162 proofs checked against an independent tree computation,
a real server's signed log, and detection of tampered proofs, forks and truncation."""

from __future__ import annotations

import hashlib
import json
import os
import random
import struct
import subprocess
from pathlib import Path

import msgpack
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from qpq_server.client import QpqClient
from qpq_server.client.errors import ClientError
from qpq_server.client.kt import KtVerifier, KtViolation
from qpq_server.devserver import BIN, RunningServer, running_server, start_server
from qpq_server.kt.keymap import KeyMap, verify_map_inclusion
from qpq_server.kt.merkle import (
    MerkleTree,
    ProofError,
    leaf_hash,
    verify_consistency,
    verify_inclusion,
)
from qpq_server.kt.sth import SignedTreeHead, TreeHeadSigner, kt_leaf, verify_tree_head
from tests.server.conftest import ClientFactory

# -- an independent, literal reading of RFC 9162 section 2.1 (hashlib, recursion) -------


def _k(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def mth(d: list[bytes]) -> bytes:
    if not d:
        return hashlib.sha256(b"").digest()
    if len(d) == 1:
        return hashlib.sha256(b"\x00" + d[0]).digest()
    k = _k(len(d))
    return hashlib.sha256(b"\x01" + mth(d[:k]) + mth(d[k:])).digest()


def path(m: int, d: list[bytes]) -> list[bytes]:
    if len(d) <= 1:
        return []
    k = _k(len(d))
    if m < k:
        return [*path(m, d[:k]), mth(d[k:])]
    return [*path(m - k, d[k:]), mth(d[:k])]


def subproof(m: int, d: list[bytes], b: bool) -> list[bytes]:
    if m == len(d):
        return [] if b else [mth(d)]
    k = _k(len(d))
    if m <= k:
        return [*subproof(m, d[:k], b), mth(d[k:])]
    return [*subproof(m - k, d[k:], False), mth(d[:k])]


DATA = [f"leaf-{i}".encode() for i in range(40)]


def test_roots_and_proofs_match_an_independent_computation() -> None:
    tree = MerkleTree()
    assert tree.root() == hashlib.sha256(b"").digest()
    for item in DATA:
        tree.append(item)
    for n in range(len(DATA) + 1):
        assert tree.root(n) == mth(DATA[:n])
        for m in range(n):
            proof = tree.inclusion_proof(m, n)
            assert proof == path(m, DATA[:n])
            verify_inclusion(leaf_hash(DATA[m]), m, n, proof, mth(DATA[:n]))
        for m in range(1, n):
            proof = tree.consistency_proof(m, n)
            assert proof == subproof(m, DATA[:n], True)
            verify_consistency(m, n, mth(DATA[:m]), mth(DATA[:n]), proof)


def test_tampered_inclusion_proofs_are_rejected() -> None:
    tree = MerkleTree()
    for item in DATA[:13]:
        tree.append(item)
    root, proof = tree.root(), tree.inclusion_proof(5)
    good = leaf_hash(DATA[5])
    flipped = [bytes([proof[0][0] ^ 1]) + proof[0][1:], *proof[1:]]
    for args in [(good, 5, 13, flipped, root), (good, 6, 13, proof, root),
                 (leaf_hash(b"other"), 5, 13, proof, root), (good, 5, 13, proof[:-1], root),
                 (good, 5, 13, [*proof, proof[0]], root),
                 # (the size itself is bound by the signed head, not by the path)
                 (good, 13, 13, proof, root), (good, 5, 13, proof, mth(DATA[:12]))]:
        with pytest.raises(ProofError):
            verify_inclusion(*args)


def test_forked_and_truncated_histories_fail_consistency() -> None:
    honest = MerkleTree()
    for item in DATA[:20]:
        honest.append(item)
    forked_data = [*DATA[:7], b"rewritten", *DATA[8:20]]
    # A fork: same size 20, one old leaf rewritten. No proof links 10 -> forked 20.
    with pytest.raises(ProofError):
        verify_consistency(10, 20, mth(DATA[:10]), mth(forked_data),
                           honest.consistency_proof(10, 20))
    with pytest.raises(ProofError):  # same size, two roots
        verify_consistency(20, 20, mth(DATA[:20]), mth(forked_data), [])
    with pytest.raises(ProofError):  # the log shrank (truncated)
        verify_consistency(20, 15, mth(DATA[:20]), mth(DATA[:15]), [])
    proof = honest.consistency_proof(6, 20)
    with pytest.raises(ProofError):  # tampered consistency proof
        verify_consistency(6, 20, mth(DATA[:6]), mth(DATA[:20]),
                           [proof[0], bytes(32), *proof[2:]])


def test_tree_head_signature_covers_size_root_and_time() -> None:
    key = Ed25519PrivateKey.generate()
    public = key.public_key().public_bytes(serialization.Encoding.Raw,
                                           serialization.PublicFormat.Raw)
    head = TreeHeadSigner(key).sign(3, mth(DATA[:3]), 1000, b"\x05" * 32)
    verify_tree_head(head, public)
    sig = head.signature
    for forged in (SignedTreeHead(4, head.root, 1000, sig, head.map_root),
                   SignedTreeHead(3, mth(DATA[:4]), 1000, sig, head.map_root),
                   SignedTreeHead(3, head.root, 1001, sig, head.map_root),
                   SignedTreeHead(3, head.root, 1000, sig, b"\x06" * 32)):
        with pytest.raises(ProofError):
            verify_tree_head(forged, public)


# -- the current-key map: an independent, literal reading of its spec (hashlib) ---------


def spec_position(user: str) -> int:
    return int.from_bytes(hashlib.sha256(b"qpq-kt-map/1\x00" + user.encode()).digest(), "big")


def spec_leaf(user: str, identity: bytes) -> bytes:
    position = hashlib.sha256(b"qpq-kt-map/1\x00" + user.encode()).digest()
    return hashlib.sha256(b"\x02" + position + identity).digest()


def spec_root(entries: dict[str, bytes], depth: int = 0) -> bytes:
    if not entries:
        return bytes(32)
    if len(entries) == 1:
        ((user, identity),) = entries.items()
        return spec_leaf(user, identity)
    bit = {u: (spec_position(u) >> (255 - depth)) & 1 for u in entries}
    left = {u: k for u, k in entries.items() if bit[u] == 0}
    right = {u: k for u, k in entries.items() if bit[u] == 1}
    return hashlib.sha256(b"\x03" + spec_root(left, depth + 1)
                          + spec_root(right, depth + 1)).digest()


def test_key_map_matches_its_spec_and_proves_only_the_current_key() -> None:
    rng = random.Random(7)
    current: dict[str, bytes] = {}
    incremental = KeyMap()
    assert incremental.root == spec_root({}) == bytes(32)
    for step in range(300):
        user, key = f"user{rng.randrange(60)}", rng.randbytes(64)
        previous = current.get(user)
        current[user] = key
        incremental.update(user, key)
        if step % 25 == 0 or step == 299:
            assert incremental.root == spec_root(current) == KeyMap(current).root
        verify_map_inclusion(user, key, incremental.proof(user), incremental.root)
        if previous is not None and previous != key:  # the replaced key no longer proves
            with pytest.raises(ProofError):
                verify_map_inclusion(user, previous, incremental.proof(user),
                                     incremental.root)
    some = next(iter(current))
    path = incremental.proof(some)
    for bad in ([bytes([path[0][0] ^ 1]) + path[0][1:], *path[1:]] if path else [b"x"],
                path[:-1] if path else [bytes(32)], [*path, bytes(32)]):
        with pytest.raises(ProofError):
            verify_map_inclusion(some, current[some], bad, incremental.root)
    with pytest.raises(ProofError):  # someone else's key under this name
        other = next(u for u in current if u != some)
        verify_map_inclusion(some, current[other], incremental.proof(other),
                             incremental.root)
    with pytest.raises(ProofError):
        incremental.proof("nobody")


# -- a real server -----------------------------------------------------------------------


def server_public_key(srv: RunningServer) -> bytes:
    key = serialization.load_pem_private_key(
        (srv.data_dir / "kt" / "signing_key.pem").read_bytes(), password=None)
    assert isinstance(key, Ed25519PrivateKey)
    return key.public_key().public_bytes(serialization.Encoding.Raw,
                                         serialization.PublicFormat.Raw)


async def test_server_log_matches_independent_tree_of_published_keys(
        server: RunningServer, client: ClientFactory) -> None:
    names = ["kt_a", "kt_b", "kt_c", "kt_d", "kt_e"]
    async with client() as c:
        for name in names:
            await c.register(name, "pw")
        leaves = [kt_leaf(n, c.profile(n).identity_public) for n in names]
        answer = await c.conn.call("kt_head")
        assert answer["public_key"] == server_public_key(server)
        head = SignedTreeHead.from_wire(answer["head"])
        verify_tree_head(head, server_public_key(server))
        assert head.size == len(names)
        assert head.root == mth(leaves)
        for i, name in enumerate(names):
            found = await c.conn.call("kt_lookup", username=name)
            assert found["identity_key"] == c.profile(name).identity_public
            assert found["leaf_index"] == i
            assert found["audit_path"] == path(i, leaves)
        proof = await c.conn.call("kt_consistency", first=2, second=5)
        assert proof["proof"] == subproof(2, leaves, True)
        inc = await c.conn.call("kt_inclusion", username="kt_c",
                                identity_key=c.profile("kt_c").identity_public)
        assert inc["audit_path"] == path(2, leaves)
        # sending verifies the recipient's key against the log and pins the head
        await c.send_text("kt_a", ["kt_b"], "verified hello")
        assert [m.text for m in await c.receive("kt_b")] == ["verified hello"]
        pinned = json.loads(c.kt.pin_path.read_text())
        assert pinned["head"]["size"] == 5
        assert pinned["public_key"] == server_public_key(server).hex()

    assert server.metric("qpq_kt_log_size") == 5


@pytest.mark.parametrize(("request_", "code"), [
    ({"op": "kt_lookup", "username": "nobody_here"}, "unknown_user"),
    ({"op": "kt_lookup", "username": "../x"}, "bad_request"),
    ({"op": "kt_consistency", "first": 3, "second": 10**6}, "bad_request"),
    ({"op": "kt_consistency", "first": -1, "second": 0}, "bad_request"),
    ({"op": "kt_consistency", "first": "0", "second": 0}, "bad_request"),
    ({"op": "kt_inclusion", "username": "kt_a", "identity_key": b"short"}, "bad_request"),
    ({"op": "kt_inclusion", "username": "kt_a", "identity_key": b"\x00" * 64}, "not_found"),
])
async def test_bad_kt_requests_get_stable_error_codes(
        server: RunningServer, client: ClientFactory, request_: dict[str, object],
        code: str) -> None:
    async with client() as c:
        response = await c.conn.call_raw(request_)
        assert response["ok"] is False and response["error"]["code"] == code


async def test_tampered_proof_and_head_from_the_server_are_detected(
        client: ClientFactory, tmp_path: Path) -> None:
    async with client() as c:
        await c.register("kt_t1", "pw")
        await c.register("kt_t2", "pw")
        found = await c.conn.call("kt_lookup", username="kt_t2")
        verifier = KtVerifier(c.conn, tmp_path / "fresh-profile")
        key = found["identity_key"]
        bad_path = dict(found, audit_path=[bytes(32), *found["audit_path"][1:]])
        with pytest.raises(KtViolation) as err:
            await verifier.verify_key("kt_t2", key, bad_path)
        assert err.value.code == "kt_bad_proof" and "SECURITY" in err.value.message
        with pytest.raises(KtViolation):  # someone else's key under this name
            await verifier.verify_key("kt_t1", key, found)
        head = dict(found["head"], root=bytes(32))
        with pytest.raises(KtViolation) as err:
            await verifier.verify_key("kt_t2", key, dict(found, head=head))
        assert err.value.code == "kt_bad_signature"
        with pytest.raises(KtViolation):
            await verifier.verify_key("kt_t2", key, None)
        verified = await verifier.verify_key("kt_t2", key, found)
        assert verified.previous_size == found["head"]["size"]  # pinned by the first check


def kt_cli(srv: RunningServer, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QPQ_")}
    env["QPQ_AUTH_TOKEN"] = srv.auth_token
    return subprocess.run(
        [str(BIN / "qpq-client"), "--server", srv.address, "--ca", str(srv.ca_cert),
         "--server-name", "localhost", "--profile", str(profile), "kt", "verify", *args],
        capture_output=True, text=True, timeout=60, env=env)


def read_records(path: Path) -> list[bytes]:
    data, records, offset = path.read_bytes(), [], 0
    while offset < len(data):
        (length,) = struct.unpack_from(">I", data, offset)
        records.append(data[offset : offset + 4 + length])
        offset += 4 + length
    return records


def record(username: str, leaf: bytes) -> bytes:
    body = msgpack.packb([username, leaf, 1.0], use_bin_type=True)
    return struct.pack(">I", len(body)) + body


async def test_client_detects_truncated_and_forked_logs_across_restarts(
        tmp_path: Path) -> None:
    with running_server(tmp_path, overrides={"storage": {"backend": "file"},
                                             "rate_limit": {"enabled": False}}) as srv:
        async with srv.connect() as conn:
            c = QpqClient(conn, tmp_path / "profiles")
            for name in ("f_a", "f_b", "f_c"):
                await c.register(name, "pw")
        profile = tmp_path / "cli-profile"
        ok = kt_cli(srv, profile, "f_a", "--json")
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout)["tree_size"] == 3
        ok = kt_cli(srv, profile, "f_c")
        assert ok.returncode == 0 and "consistent with the pinned head of size 3" in ok.stdout
        srv.stop()
        log_path = srv.data_dir / "store" / "kt" / "leaves"
        original = read_records(log_path)

        log_path.write_bytes(b"".join(original[:2]))  # truncated history
        srv = start_server(srv.config_path)
        bad = kt_cli(srv, profile, "f_a")
        assert bad.returncode == 2, bad.stdout + bad.stderr
        assert "kt_rollback" in bad.stderr and "SECURITY" in bad.stderr
        srv.stop()

        forged = record("f_c", kt_leaf("f_c", b"\x07" * 32))
        log_path.write_bytes(b"".join([*original[:2], forged]))  # same size, rewritten
        srv = start_server(srv.config_path)
        bad = kt_cli(srv, profile, "f_a")
        assert bad.returncode == 2 and "kt_fork" in bad.stderr
        srv.stop()

        log_path.write_bytes(b"".join([*original[:2], forged, original[2]]))  # grown, forked
        srv = start_server(srv.config_path)
        try:
            bad = kt_cli(srv, profile, "f_a")
            assert bad.returncode == 2 and "kt_fork" in bad.stderr
            # a fresh profile (no pin) accepts the current log: detection needs the pin
            assert kt_cli(srv, tmp_path / "other-profile", "f_a").returncode == 0
        finally:
            srv.stop()


class SplitViewLog:
    """A server showing one user log A: answers from tree A, signs with the real key."""

    server = "split-view"

    def __init__(self, signer: TreeHeadSigner, tree: MerkleTree) -> None:
        self.signer, self.tree = signer, tree

    def head(self, size: int) -> SignedTreeHead:
        return self.signer.sign(size, self.tree.root(size), 1000 + size, bytes(32))

    async def call(self, op: str, timeout: float | None = None,
                   **fields: object) -> dict[str, object]:
        if op == "kt_head":
            return {"head": self.head(len(self.tree)).to_wire(),
                    "public_key": self.signer.public_key}
        if op == "kt_consistency":
            first, second = int(str(fields["first"])), int(str(fields["second"]))
            if second > len(self.tree):
                raise ClientError("bad_request", "need first <= second <= size")
            return {"proof": self.tree.consistency_proof(first, second)}
        raise AssertionError(op)


async def test_gossiped_heads_reveal_a_split_view(tmp_path: Path) -> None:
    """alice and bob are each shown a consistent log, but not the same one: the head bob
    pinned, carried in his end-to-end-encrypted message, shows alice the fork."""
    signer = TreeHeadSigner(Ed25519PrivateKey.generate())
    view_a, view_b = MerkleTree(), MerkleTree()
    for item in DATA[:10]:
        view_a.append(item)
    for item in [*DATA[:5], b"bob's key, as only alice's contacts see it", *DATA[6:12]]:
        view_b.append(item)
    alice_server = SplitViewLog(signer, view_a)
    alice = KtVerifier(alice_server, tmp_path / "alice")
    await alice.check_head(alice_server.head(10))
    bob_server = SplitViewLog(signer, view_b)
    await alice.check_gossip(alice_server.head(7).to_wire())  # an older head of hers: fine
    await alice.check_gossip(alice_server.head(10).to_wire())
    for size in (8, 10, 12):  # older, same size, newer than alice's pin
        with pytest.raises(KtViolation) as err:
            await alice.check_gossip(bob_server.head(size).to_wire())
        assert err.value.code in ("kt_fork", "kt_rollback") and "SECURITY" in err.value.message
    other_key = TreeHeadSigner(Ed25519PrivateKey.generate())
    with pytest.raises(KtViolation):  # a head the log key never signed
        await alice.check_gossip(SplitViewLog(other_key, view_a).head(10).to_wire())
    with pytest.raises(KtViolation):
        await alice.check_gossip({"size": "x"})
