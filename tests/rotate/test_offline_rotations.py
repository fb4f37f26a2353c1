"""db-key, OPAQUE and federation rotation end to end on real data dirs."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

import qpq_ops.rotate.federation as rotate_federation_module
from qpq_server.errors import WrongDatabaseKey
from qpq_server.federation.certs import (
    CA_CERT,
    CERT,
    init_ca,
    issue_cert,
    verify_peer_certificate,
)
from qpq_server.secrets import Secret, read_env_file, write_env_file
from qpq_server.storage.sqlcipher import connect_sqlcipher, key_pragma
from tests.backup.support import ops, populate, tree_digest
from tests.helpers.server import init_data_dir, start_server
from tests.server.conftest import client_factory_for


def _opens(db: Path, key: str) -> bool:
    try:
        connect_sqlcipher(db, Secret(key)).close()
    except WrongDatabaseKey:
        return False
    return True


async def test_db_key_rotation_rekeys_after_a_verified_backup(tmp_path: Path) -> None:
    config = init_data_dir(tmp_path / "d")
    await populate(config, tmp_path / "p")
    env, db = config.parent / ".env", config.parent / "qpq.db"
    old = read_env_file(env)["QPQ_DB_KEY"]

    before = tree_digest(config.parent)
    dry = ops("rotate", "db-key", "--config", config, "--dry-run", "--json")
    assert dry.exit_code == 0 and len(dry.json()["steps"]) == 5
    assert tree_digest(config.parent) == before

    srv = start_server(config)
    try:
        running = ops("rotate", "db-key", "--config", config)
        assert running.exit_code == 64 and "is running" in running.stderr
        rotated = ops("rotate", "db-key", "--config", config, "--stop", "--json")
        assert rotated.exit_code == 0, rotated.stderr
        assert srv.process.wait(timeout=20) == 0  # stopped cleanly through its pid file
    finally:
        srv.stop()
    new = read_env_file(env)["QPQ_DB_KEY"]
    assert new != old and "QPQ_DB_KEY_NEXT" not in read_env_file(env)
    assert not _opens(db, old) and _opens(db, new)
    assert new not in rotated.stdout + rotated.stderr and old not in rotated.stdout
    [backup] = (config.parent / "pre-rotation-backups").glob("*-with-secrets.tar")
    verified = ops("backup", "verify", backup, env={"QPQ_DB_KEY": old})
    assert verified.exit_code == 0, verified.stderr  # restorable with the old key

    srv = start_server(config)
    try:
        async with client_factory_for(srv, tmp_path / "p")() as c:
            await c.login("bob", "pw-bob")
            assert [m.text for m in await c.receive("bob")] == [
                "message 0", "message 1", "message 2"]
    finally:
        srv.stop()


def test_db_key_rotation_has_no_finish_step(tmp_path: Path) -> None:
    config = init_data_dir(tmp_path / "d")
    result = ops("rotate", "db-key", "--config", config, "--finish")
    assert result.exit_code == 64 and "no second step" in result.stderr


def test_db_key_rotation_with_a_wrong_current_key_changes_nothing(tmp_path: Path) -> None:
    config = init_data_dir(tmp_path / "d")
    asyncio.run(populate(config, tmp_path / "p", messages=1))
    env = config.parent / ".env"
    values = read_env_file(env)
    values["QPQ_DB_KEY"] = "cd" * 32
    write_env_file(env, values)
    before = tree_digest(config.parent)
    result = ops("rotate", "db-key", "--config", config)
    assert result.exit_code == 3 and "does not open" in result.stderr
    assert tree_digest(config.parent) == before


def test_db_key_rotation_interrupted_after_rekey_is_completed_by_a_rerun(
        tmp_path: Path) -> None:
    config = init_data_dir(tmp_path / "d")
    asyncio.run(populate(config, tmp_path / "p", messages=1))
    env, db = config.parent / ".env", config.parent / "qpq.db"
    values = read_env_file(env)
    new = "ef" * 32
    conn = connect_sqlcipher(db, Secret(values["QPQ_DB_KEY"]))  # the crash point: re-keyed,
    conn.execute(key_pragma(Secret(new)).replace("PRAGMA key", "PRAGMA rekey"))
    conn.close()
    values["QPQ_DB_KEY_NEXT"] = new                            # .env not yet final
    write_env_file(env, values)
    result = ops("rotate", "db-key", "--config", config)
    assert result.exit_code == 0, result.stderr
    assert read_env_file(env)["QPQ_DB_KEY"] == new and _opens(db, new)
    start_server(config).stop()


async def test_opaque_rotation_locks_nobody_out_and_finish_retires_unused_setups(
        tmp_path: Path) -> None:
    config = init_data_dir(tmp_path / "d")
    await populate(config, tmp_path / "p", messages=0)
    opaque = config.parent / "opaque"
    rotated = ops("rotate", "opaque", "--config", config, "--json")
    assert rotated.exit_code == 0, rotated.stderr
    assert (opaque / "setup-v2.bin").is_file() and (opaque / "setup-v1.bin").is_file()
    early = ops("rotate", "opaque", "--config", config, "--finish", "--json")
    assert early.exit_code == 0 and "2 accounts still on v1" in early.json()["next_steps"][0]
    assert (opaque / "setup-v1.bin").is_file()

    srv = start_server(config)  # the restart that loads v2
    try:
        async with client_factory_for(srv, tmp_path / "p")() as c:
            await c.login("alice", "pw-alice")  # logs in under v1, moves to v2
            await c.login("bob", "pw-bob")
            await c.register("carol", "pw-carol")  # new accounts start on v2
    finally:
        srv.stop()
    finished = ops("rotate", "opaque", "--config", config, "--finish", "--json")
    assert finished.exit_code == 0, finished.stderr
    assert not (opaque / "setup-v1.bin").exists()
    assert (opaque / "retired" / "setup-v1.bin").is_file()  # retired, never deleted
    srv = start_server(config)
    try:
        async with client_factory_for(srv, tmp_path / "p")() as c:
            for user in ("alice", "bob", "carol"):
                await c.login(user, f"pw-{user}")
    finally:
        srv.stop()
    kinds = [(r["kind"], r["action"]) for r in
             ops("rotate", "audit", "--config", config, "--json").json()["records"]]
    assert kinds == [("opaque", "rotate"), ("opaque", "retire")]


def _verify(leaf: x509.Certificate, ca: x509.Certificate, name: str) -> None:
    store = Store([ca])
    PolicyBuilder().store(store).build_server_verifier(x509.DNSName(name)).verify(leaf, [])
    PolicyBuilder().store(store).build_client_verifier().verify(leaf, [])  # mutual TLS


def test_federation_rotation_issues_certificates_that_chain_to_the_ca(tmp_path: Path) -> None:
    config = init_data_dir(tmp_path / "d")
    fed = config.parent  # DESIGN.md's names in the data dir, DER like issue-cert writes
    before = tree_digest(config.parent)
    assert ops("rotate", "federation", "--config", config, "--dry-run").exit_code == 0
    assert tree_digest(config.parent) == before

    first = ops("rotate", "federation", "--config", config, "--json")
    assert first.exit_code == 0, first.stderr
    ca1 = x509.load_der_x509_certificate((fed / "federation-ca.der").read_bytes())
    leaf1 = x509.load_der_x509_certificate((fed / "federation-cert.der").read_bytes())
    _verify(leaf1, ca1, "localhost")
    assert (fed / "federation-ca-key.der").stat().st_mode & 0o777 == 0o600
    assert any("send" in s and "federation-ca.der" in s for s in first.json()["next_steps"])

    second = ops("rotate", "federation", "--config", config, "--json")
    assert second.exit_code == 0
    leaf2 = x509.load_der_x509_certificate((fed / "federation-cert.der").read_bytes())
    assert leaf2.serial_number != leaf1.serial_number
    assert x509.load_der_x509_certificate((fed / "federation-ca.der").read_bytes()) == ca1  # CA kept
    _verify(leaf2, ca1, "localhost")
    assert "peers need do nothing" in second.json()["next_steps"][0]

    third = ops("rotate", "federation", "--config", config, "--new-ca", "--json")
    assert third.exit_code == 0
    ca2 = x509.load_der_x509_certificate((fed / "federation-ca.der").read_bytes())
    leaf3 = x509.load_der_x509_certificate((fed / "federation-cert.der").read_bytes())
    _verify(leaf3, ca2, "localhost")
    with pytest.raises(VerificationError):
        _verify(leaf3, ca1, "localhost")
    bundle = x509.load_pem_x509_certificates((fed / "federation-ca-bundle.pem").read_bytes())
    assert bundle == [ca2, ca1]
    assert leaf3.not_valid_after_utc > dt.datetime.now(dt.UTC)

    finished = ops("rotate", "federation", "--config", config, "--finish", "--json")
    assert finished.exit_code == 0, finished.stderr
    assert not list(fed.glob("*.previous"))
    assert x509.load_pem_x509_certificates((fed / "federation-ca-bundle.pem").read_bytes()) == [ca2]
    _verify(leaf3, ca2, "localhost")


def test_federation_rotation_without_the_ca_key_is_refused(tmp_path: Path) -> None:
    config = init_data_dir(tmp_path / "d")
    assert ops("rotate", "federation", "--config", config).exit_code == 0
    (config.parent / "federation-ca-key.der").unlink()
    before = tree_digest(config.parent)
    result = ops("rotate", "federation", "--config", config)
    assert result.exit_code == 64 and "federation-ca-key.der" in result.stderr
    assert tree_digest(config.parent) == before


def test_federation_certificates_have_one_implementation(tmp_path: Path) -> None:
    """`rotate federation` and `qpq-server federation init-ca/issue-cert` make the same
    certificates because one module (qpq_server.federation.certs) builds them both."""
    source = Path(rotate_federation_module.__file__).read_text()
    assert "CertificateBuilder" not in source, "qpq_ops builds federation certs itself"
    config = init_data_dir(tmp_path / "d")
    assert ops("rotate", "federation", "--config", config).exit_code == 0
    init_ca(tmp_path / "ca")
    issue_cert(tmp_path / "ca", "localhost", tmp_path / "leaf")

    def shape(path: Path) -> tuple[list[str], bool]:
        cert = x509.load_der_x509_certificate(path.read_bytes())
        return sorted(e.oid.dotted_string for e in cert.extensions), "CA" in str(cert.subject)

    assert shape(config.parent / "federation-ca.der") == shape(tmp_path / "ca" / CA_CERT)
    assert shape(config.parent / "federation-cert.der") == shape(tmp_path / "leaf" / CERT)
    ops_ca = x509.load_der_x509_certificate((config.parent / "federation-ca.der").read_bytes())
    ops_leaf = x509.load_der_x509_certificate(
        (config.parent / "federation-cert.der").read_bytes())
    assert verify_peer_certificate(ops_leaf, [ops_ca]) == "localhost"
