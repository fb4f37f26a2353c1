"""A peer that lies about its users' keys is refused, and nothing is encrypted to it.

b.example is a real server made to lie the two ways a compromised peer could: it hands
out a key its key-transparency log never recorded (its stored key for carol swapped
behind the log's back), and it signs its log heads with a key other than the one
alice's client pinned at first contact. Each time the real `qpq-client send` from
a.example exits 2 (a verification failure) and a.example stores nothing: no relay for
the peer is queued, so no ciphertext for the forged key ever leaves.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from qpq_server.secrets import Secret, read_env_file
from qpq_server.storage.sqlcipher import connect_sqlcipher
from qpq_server.tls import write_private_file
from tests.federation.conftest import Site, cli


def _sql(site: Site, query: str, args: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    """`query` on the site's database (the server may be running: WAL allows it)."""
    data_dir = site.config_path.parent
    key = read_env_file(data_dir / ".env")["QPQ_DB_KEY"]
    conn = connect_sqlcipher(data_dir / "qpq.db", Secret(key))
    try:
        rows = conn.execute(query, args).fetchall()
        return [tuple(r) for r in rows]
    finally:
        conn.close()


def _stored_messages(site: Site) -> int:
    (count,), = _sql(site, "SELECT count(*) FROM messages")
    return int(count)  # type: ignore[call-overload]


def _refused(a: Site, profile: Path, text: str) -> str:
    before = _stored_messages(a)
    sent = cli(a.running, profile, "send", "alice", "carol@b.example", text)
    assert sent.returncode == 2, (sent.returncode, sent.stdout, sent.stderr)
    assert _stored_messages(a) == before, "a message for the forged key was queued"
    return sent.stderr


def test_a_peer_handing_out_forged_keys_is_refused(sites: tuple[Site, Site],
                                                   tmp_path: Path) -> None:
    a, b = sites
    pa, pb = tmp_path / "alice", tmp_path / "carol"
    assert cli(b.running, pb, "register", "carol").returncode == 0
    assert cli(a.running, pa, "register", "alice").returncode == 0
    first = cli(a.running, pa, "send", "alice", "carol@b.example", "first contact")
    assert first.returncode == 0, first.stderr  # pins b.example's log key and head

    # 1. A key the log never recorded: carol's stored key swapped behind the log's back.
    b.stop()
    (real,), = _sql(b, "SELECT identity_key FROM accounts WHERE username = 'carol'")
    assert isinstance(real, bytes)
    forged = os.urandom(len(real))
    _sql(b, "UPDATE accounts SET identity_key = ? WHERE username = 'carol'", (forged,))
    b.start()
    assert "kt_missing_proof" in _refused(a, pa, "to a forged key")

    # 2. Heads signed by another key than the one pinned (carol's real key is back).
    b.stop()
    _sql(b, "UPDATE accounts SET identity_key = ? WHERE username = 'carol'", (real,))
    other = ed25519.Ed25519PrivateKey.generate()
    write_private_file(b.config_path.parent / "kt" / "signing_key.pem", other.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    b.start()
    assert "kt_bad_signature" in _refused(a, pa, "under a forged head")
