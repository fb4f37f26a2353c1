"""auth-token and TLS rotation against a running server: clients keep working."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from qpq_server.client import ClientError
from qpq_server.devserver import await_until, init_server_dir, start_server
from qpq_server.secrets import read_env_file
from qpq_server.tls import write_self_signed
from tests.backup.support import ops, tree_digest


def _write_expired(cert_path: Path, key_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=10))
            .not_valid_after(now - dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), False)
            .sign(key, hashes.SHA256()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))


async def test_auth_token_rotation_keeps_clients_working(tmp_path: Path) -> None:
    config = init_server_dir(tmp_path / "d")
    srv = start_server(config)
    try:
        old = srv.auth_token
        before = tree_digest(config.parent)
        dry = ops("rotate", "auth-token", "--config", config, "--dry-run", "--json")
        assert dry.exit_code == 0 and dry.json()["dry_run"]
        assert tree_digest(config.parent) == before

        async with srv.connect(old) as live:
            reloads = srv.reloads()
            rotated = ops("rotate", "auth-token", "--config", config, "--json")
            assert rotated.exit_code == 0, rotated.stderr
            srv.wait_reloaded(reloads)
            assert rotated.json()["reload"].startswith("SIGHUP to pid")
            new = read_env_file(config.parent / ".env")["QPQ_AUTH_TOKEN"]
            assert new != old and new not in rotated.stdout + rotated.stderr
            assert (await live.call("ping"))["ok"]
            for token in (new, old):  # both accepted during the grace period
                async with srv.connect(token) as c:
                    assert (await c.call("ping"))["ok"]

            again = ops("rotate", "auth-token", "--config", config)
            assert again.exit_code == 64 and "--finish" in again.stderr
            early = ops("rotate", "auth-token", "--config", config, "--finish")
            assert early.exit_code == 64 and "grace period runs until" in early.stderr

            reloads = srv.reloads()
            finished = ops("rotate", "auth-token", "--config", config, "--finish", "--force")
            assert finished.exit_code == 0, finished.stderr
            srv.wait_reloaded(reloads)
            with pytest.raises(ClientError):
                async with srv.connect(old):
                    pass
            async with srv.connect(new) as c:
                assert (await c.call("ping"))["ok"]
            # Finishing revokes the old token, and with it the connection that used it.
            await await_until(lambda: live.protocol.terminated is not None, 15,
                              "the connection on the revoked token being closed")
    finally:
        srv.stop()
    audit = ops("rotate", "audit", "--config", config, "--json").json()["records"]
    assert [(r["kind"], r["action"]) for r in audit] == [("auth-token", "rotate"),
                                                         ("auth-token", "finish")]
    log = (config.parent / "audit" / "rotations.jsonl").read_text()
    assert old not in log and new not in log and audit[0]["fingerprint"].startswith("sha256:")
    assert json.loads(log.splitlines()[0])["details"]["grace_until_unix"]


async def test_tls_rotation_keeps_connections_and_serves_the_new_certificate(
        tmp_path: Path) -> None:
    config = init_server_dir(tmp_path / "d")
    tls_dir = config.parent / "tls"
    old_cert = tmp_path / "old-cert.pem"
    old_cert.write_bytes((tls_dir / "cert.pem").read_bytes())
    srv = start_server(config)
    try:
        async with srv.connect(ca=old_cert) as live:
            reloads = srv.reloads()
            rotated = ops("rotate", "tls", "--config", config, "--json")
            assert rotated.exit_code == 0, rotated.stderr
            srv.wait_reloaded(reloads)
            result = rotated.json()
            assert result["fingerprint"] != result["previous_fingerprint"]
            assert (await live.call("ping"))["ok"]  # established connection survives
            async with srv.connect(ca=tls_dir / "cert.pem") as c:
                assert (await c.call("ping"))["ok"]
            async with srv.connect(ca=tls_dir / "trust-bundle.pem") as c:
                assert (await c.call("ping"))["ok"]
            with pytest.raises(ClientError):  # the old pin no longer matches new handshakes
                async with srv.connect(ca=old_cert, timeout=3):
                    pass
            assert (tls_dir / "cert.pem.previous").read_bytes() == old_cert.read_bytes()
            assert (await live.call("ping"))["ok"]
    finally:
        srv.stop()


def test_tls_rotation_installs_a_provided_pair_only_if_it_matches_and_is_valid(
        tmp_path: Path) -> None:
    config = init_server_dir(tmp_path / "d")
    a, b = tmp_path / "a", tmp_path / "b"
    write_self_signed(a / "cert.pem", a / "key.pem", "localhost")
    write_self_signed(b / "cert.pem", b / "key.pem", "localhost")
    before = tree_digest(config.parent)
    mismatched = ops("rotate", "tls", "--config", config, "--cert", a / "cert.pem",
                     "--key", b / "key.pem")
    assert mismatched.exit_code == 64 and "does not match" in mismatched.stderr
    _write_expired(b / "cert.pem", b / "key.pem")
    expired = ops("rotate", "tls", "--config", config, "--cert", b / "cert.pem",
                  "--key", b / "key.pem")
    assert expired.exit_code == 64 and "expired" in expired.stderr
    half = ops("rotate", "tls", "--config", config, "--cert", a / "cert.pem")
    assert half.exit_code == 64 and "both --cert and --key" in half.stderr
    assert tree_digest(config.parent) == before
    installed = ops("rotate", "tls", "--config", config, "--cert", a / "cert.pem",
                    "--key", a / "key.pem", "--json")
    assert installed.exit_code == 0, installed.stderr
    assert installed.json()["reload"].startswith("server not running")
    assert (config.parent / "tls" / "cert.pem").read_bytes() == (a / "cert.pem").read_bytes()
    start_server(config).stop()  # the server serves the installed pair

    tls_dir = config.parent / "tls"
    assert ops("rotate", "tls", "--config", config, "--finish", "--dry-run").exit_code == 0
    assert (tls_dir / "key.pem.previous").exists()
    finished = ops("rotate", "tls", "--config", config, "--finish")
    assert finished.exit_code == 0, finished.stderr
    assert not (tls_dir / "key.pem.previous").exists()
    assert not (tls_dir / "cert.pem.previous").exists()
    again = ops("rotate", "tls", "--config", config, "--finish")
    assert again.exit_code == 64 and "nothing to finish" in again.stderr


async def test_staged_tls_rotation_never_fails_a_client_holding_the_bundle(
        tmp_path: Path) -> None:
    config = init_server_dir(tmp_path / "d")
    tls_dir = config.parent / "tls"
    srv = start_server(config)
    try:
        staged = ops("rotate", "tls", "--config", config, "--stage", "--json")
        assert staged.exit_code == 0, staged.stderr
        bundle = tmp_path / "client-bundle.pem"  # what the operator hands out
        bundle.write_bytes((tls_dir / "trust-bundle.pem").read_bytes())
        assert len(x509.load_pem_x509_certificates(bundle.read_bytes())) == 2
        async with srv.connect(ca=bundle) as c:  # still the current pair
            assert (await c.call("ping"))["ok"]
        reloads = srv.reloads()
        rotated = ops("rotate", "tls", "--config", config, "--json")
        assert rotated.exit_code == 0, rotated.stderr
        srv.wait_reloaded(reloads)
        assert rotated.json()["fingerprint"] == staged.json()["fingerprint"]
        assert not (tls_dir / "next-cert.pem").exists()
        async with srv.connect(ca=bundle) as c:  # now the staged pair
            assert (await c.call("ping"))["ok"]
    finally:
        srv.stop()
    both = ops("rotate", "tls", "--config", config, "--stage", "--cert", bundle)
    assert both.exit_code == 64 and "no --cert" in both.stderr


def test_auth_token_rotation_warns_when_the_environment_would_override_the_env_file(
        tmp_path: Path) -> None:
    config = init_server_dir(tmp_path / "d")
    token = read_env_file(config.parent / ".env")["QPQ_AUTH_TOKEN"]
    srv = start_server(config, env={"QPQ_AUTH_TOKEN": token})
    try:
        result = ops("rotate", "auth-token", "--config", config, "--json",
                     env={"QPQ_AUTH_TOKEN": token})
        assert result.exit_code == 1, result.stderr
        warnings = " ".join(result.json()["warnings"])
        assert "this shell's environment" in warnings
        assert f"pid {srv.process.pid}" in warnings and "overrides .env" in warnings
        assert token not in result.stdout + result.stderr
    finally:
        srv.stop()
