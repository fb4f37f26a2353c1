"""backup.yml, restore.yml and rotate-keys.yml for real, around a deployed server.

deploy.yml installs qpq into a temporary root; the test then runs that install (as
systemd would) and drives the day-2 playbooks against it.
"""

from __future__ import annotations

import json
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from qpq_server.client import ClientError, QpqClient
from tests.ansible.runner import (
    PLAYBOOKS,
    DeployedServer,
    deploy_vars,
    fake_proc,
    read_env,
    run_playbook,
)
from tests.helpers.server import running_server

pytestmark = pytest.mark.timeout(420)


@dataclass(frozen=True)
class Host:
    root: Path
    work: Path
    vars: dict[str, Any]
    server: DeployedServer

    @property
    def data_dir(self) -> Path:
        return self.root / "var/lib/qpq"

    @property
    def backups(self) -> Path:
        return self.root / "var/backups/qpq"

    def archives(self) -> list[Path]:
        return sorted(p for p in self.backups.iterdir() if p.is_file())

    def token(self) -> str:
        return read_env(self.data_dir / ".env")["QPQ_AUTH_TOKEN"]


async def register(host: Host, user: str) -> None:
    async with host.server.connect(host.token()) as conn:
        await QpqClient(conn, host.work / "profiles").register(user, f"pw-{user}")


async def login_works(host: Host, user: str) -> bool:
    # A fresh device each time: a device that pinned a key-transparency head from after
    # the backup rightly reports the restored (shorter) log as `kt_rollback`. The password
    # is accepted when the only refusal is that a new device needs a link code.
    async with host.server.connect(host.token()) as conn:
        profiles = Path(tempfile.mkdtemp(dir=host.work, prefix="device-"))
        try:
            await QpqClient(conn, profiles).login(user, f"pw-{user}")
        except ClientError as exc:
            assert exc.code in ("login_failed", "link_required"), exc
            return exc.code == "link_required"
        return True


async def token_accepted(host: Host, token: str, ca: Path | None = None) -> bool:
    try:
        async with host.server.connect(token, ca=ca):
            return True
    except ClientError as exc:
        assert exc.code == "unauthenticated"
        return False


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory, qpq_wheel: Path,
         sysctl_settings: dict[str, int]) -> Iterator[Host]:
    base = tmp_path_factory.mktemp("day2")
    root = base / "root"
    extra = deploy_vars(root, fake_proc(base / "proc", sysctl_settings), qpq_wheel)
    deployed = run_playbook("deploy.yml", base / "work", extra, tags="qpq_server,qpq_backup")
    assert deployed.rc == 0, deployed.output[-4000:]
    server = DeployedServer(root, extra["qpq_server_metrics_listen"], base / "server.log")
    server.start()
    try:
        yield Host(root=root, work=base / "work", vars=extra, server=server)
    finally:
        server.stop()


def day2_vars(host: Host, **more: Any) -> dict[str, Any]:
    return {"qpq_root": host.vars["qpq_root"], "qpq_service_manager": "none",
            "ansible_become": False, **more}


async def test_backup_playbook_writes_a_verified_archive_and_the_textfile_metric(
        host: Host) -> None:
    await register(host, "alice")
    run = run_playbook("backup.yml", host.work, day2_vars(host))
    assert run.rc == 0, run.output[-4000:]
    assert run.changed > 0
    (archive,) = host.archives()
    assert f"backup written to {archive}" in run.output
    metric = host.root / "var/lib/prometheus/node-exporter/qpq_backup.prom"
    assert "qpq_backup_last_success_timestamp_seconds" in metric.read_text()
    # Nothing comes back to the controller unless asked.
    assert not (PLAYBOOKS / "backups").exists()


def test_backup_playbook_prunes_to_the_retention_and_fetches_only_on_request(
        host: Host, tmp_path: Path) -> None:
    before = set(host.archives())
    fetch_dir = tmp_path / "fetched"
    run = run_playbook("backup.yml", host.work, day2_vars(
        host, qpq_backup_keep=1, qpq_backup_keep_daily=0, qpq_backup_fetch=True,
        qpq_backup_fetch_dir=str(fetch_dir)))
    assert run.rc == 0, run.output[-4000:]
    (kept,) = host.archives()
    assert kept not in before
    assert (fetch_dir / "localhost" / kept.name).read_bytes() == kept.read_bytes()
    assert stat.S_IMODE((fetch_dir / "localhost" / kept.name).stat().st_mode) == 0o600


async def test_restore_playbook_refuses_a_live_data_dir_then_restores_the_backup_with_force(
        host: Host) -> None:
    (archive,) = host.archives()
    await register(host, "bob")  # after the backup: the restore must forget bob
    host_path = "/" + str(archive.relative_to(host.root))
    host.server.stop()
    try:
        refused = run_playbook("restore.yml", host.work, day2_vars(
            host, qpq_backup_restore_archive=host_path))
        assert refused.rc != 0
        assert "--force" in refused.output, refused.output[-3000:]
        restored = run_playbook("restore.yml", host.work, day2_vars(
            host, qpq_backup_restore_archive=host_path, qpq_backup_restore_force=True))
        assert restored.rc == 0, restored.output[-4000:]
        assert restored.changed > 0
    finally:
        host.server.start()
    assert await login_works(host, "alice")
    assert not await login_works(host, "bob")


def test_restore_playbook_stops_on_a_missing_archive_before_touching_anything(
        host: Host) -> None:
    run = run_playbook("restore.yml", host.work, day2_vars(
        host, qpq_backup_restore_archive="/var/backups/qpq/nope.tar"))
    assert run.rc != 0
    assert "/var/backups/qpq/nope.tar does not exist on localhost" in run.output
    assert run.changed == 0
    assert host.server.ready()


def test_rotate_dry_run_and_check_mode_change_nothing(host: Host) -> None:
    env_before = (host.data_dir / ".env").read_bytes()
    dry = run_playbook("rotate-keys.yml", host.work, day2_vars(
        host, qpq_rotate_kind="auth-token", qpq_rotate_dry_run=True))
    assert dry.rc == 0, dry.output[-4000:]
    assert dry.changed == 0
    check = run_playbook("rotate-keys.yml", host.work, day2_vars(
        host, qpq_rotate_kind="auth-token"), check=True)
    assert check.rc == 0, check.output[-4000:]
    assert (host.data_dir / ".env").read_bytes() == env_before


async def test_rotate_auth_token_keeps_the_old_token_for_the_grace_window_then_finishes(
        host: Host, tmp_path: Path) -> None:
    old = read_env(host.data_dir / ".env")["QPQ_AUTH_TOKEN"]
    fetch_dir = tmp_path / "asked-for-secrets"
    run = run_playbook("rotate-keys.yml", host.work, day2_vars(
        host, qpq_rotate_kind="auth-token", qpq_rotate_grace_hours=1.0,
        qpq_rotate_fetch_dir=str(fetch_dir), qpq_rotate_fetch_secrets=True))
    assert run.rc == 0, run.output[-4000:]
    env = read_env(host.data_dir / ".env")
    assert env["QPQ_AUTH_TOKEN"] != old
    assert env["QPQ_AUTH_TOKEN_PREVIOUS"] == old
    assert old not in run.output and env["QPQ_AUTH_TOKEN"] not in run.output
    # Asked for: the new token comes back, in the host's 0600 .env.
    assert read_env(fetch_dir / "localhost" / ".env")["QPQ_AUTH_TOKEN"] == env["QPQ_AUTH_TOKEN"]
    assert stat.S_IMODE((fetch_dir / "localhost" / ".env").stat().st_mode) == 0o600
    # The server got the SIGHUP: both tokens work during the grace window.
    assert await token_accepted(host, env["QPQ_AUTH_TOKEN"])
    assert await token_accepted(host, old)
    early = run_playbook("rotate-keys.yml", host.work, day2_vars(
        host, qpq_rotate_kind="auth-token", qpq_rotate_finish=True))
    assert early.rc != 0  # the grace window is still open
    assert "QPQ_AUTH_TOKEN_PREVIOUS" in read_env(host.data_dir / ".env")
    finish = run_playbook("rotate-keys.yml", host.work, day2_vars(
        host, qpq_rotate_kind="auth-token", qpq_rotate_finish=True,
        qpq_rotate_finish_early=True))
    assert finish.rc == 0, finish.output[-4000:]
    assert "QPQ_AUTH_TOKEN_PREVIOUS" not in read_env(host.data_dir / ".env")
    assert not await token_accepted(host, old)
    assert await token_accepted(host, env["QPQ_AUTH_TOKEN"])
    audit = [json.loads(line) for line in
             (host.data_dir / "audit" / "rotations.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in audit][-2:] == ["auth-token", "auth-token"]


async def test_rotate_tls_fetches_the_public_certificate_and_no_secret(
        host: Host, tmp_path: Path) -> None:
    cert = host.data_dir / "tls" / "cert.pem"
    old_cert = cert.read_bytes()
    fetch_dir = tmp_path / "from-host"
    run = run_playbook("rotate-keys.yml", host.work, day2_vars(
        host, qpq_rotate_kind="tls", qpq_rotate_fetch_dir=str(fetch_dir)))
    assert run.rc == 0, run.output[-4000:]
    assert cert.read_bytes() != old_cert
    fetched = {p.relative_to(fetch_dir) for p in fetch_dir.rglob("*") if p.is_file()}
    assert Path("localhost/tls/cert.pem") in fetched
    assert fetched <= {Path("localhost/tls") / name
                       for name in ("cert.pem", "trust-bundle.pem", "next-cert.pem")}
    assert (fetch_dir / "localhost/tls/cert.pem").read_bytes() == cert.read_bytes()
    # The server reloaded: a client trusting only the fetched certificate gets in.
    assert await token_accepted(host, host.token(), ca=fetch_dir / "localhost/tls/cert.pem")
    finish = run_playbook("rotate-keys.yml", host.work, day2_vars(
        host, qpq_rotate_kind="tls", qpq_rotate_finish=True))
    assert finish.rc == 0, finish.output[-4000:]
    assert not list((host.data_dir / "tls").glob("*.previous"))
    assert await token_accepted(host, host.token())


def test_rotate_refuses_finish_for_a_kind_without_a_second_step(host: Host) -> None:
    run = run_playbook("rotate-keys.yml", host.work, day2_vars(
        host, qpq_rotate_kind="db-key", qpq_rotate_finish=True))
    assert run.rc != 0
    assert ("qpq_rotate_finish exists for auth-token, tls, federation, opaque only"
            in " ".join(run.output.split())), run.output[-3000:]
    assert run.changed == 0


def test_redeploy_with_another_db_key_is_refused_before_any_change(host: Host) -> None:
    env_before = (host.data_dir / ".env").read_bytes()
    assert (host.data_dir / "qpq.db").exists()
    run = run_playbook("deploy.yml", host.work, {
        **host.vars, "qpq_server_db_key": "f" * 64}, tags="qpq_server")
    assert run.rc != 0
    assert "qpq_server_db_key differs from the key of the existing database" in " ".join(
        run.output.split()), run.output[-3000:]
    assert run.changed == 0
    assert (host.data_dir / ".env").read_bytes() == env_before
    assert "f" * 64 not in run.output


def test_restore_without_a_limit_to_one_host_is_refused(host: Host) -> None:
    (archive,) = host.archives()
    run = run_playbook("restore.yml", host.work, day2_vars(
        host, qpq_backup_restore_archive="/" + str(archive.relative_to(host.root))),
        servers=("localhost", "qpq-2.example.org"))
    assert run.rc != 0
    assert "add --limit HOST" in " ".join(run.output.split()), run.output[-3000:]
    assert run.changed == 0
    assert host.server.ready()


def test_restore_refuses_an_archive_of_another_domain(host: Host, tmp_path: Path) -> None:
    # Another deployment's server, run once so it has a database to back up.
    with running_server(tmp_path, overrides={"server": {"domain": "other.example.net"}}) as other:
        config = other.data_dir / "qpq-server.toml"
    dest = host.root / "var/backups/other"
    made = subprocess.run([str(host.root / "opt/qpq/venv/bin/qpq-ops"), "backup", "create",
                           "--config", str(config), "--dest", str(dest), "--json"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert made.returncode == 0, made.stdout + made.stderr
    archive = Path(json.loads(made.stdout)["archive"])
    run = run_playbook("restore.yml", host.work, day2_vars(
        host, qpq_backup_restore_archive="/" + str(archive.relative_to(host.root)),
        qpq_backup_restore_force=True))
    assert run.rc != 0
    text = " ".join(run.output.split())
    assert ("it was made on domain other.example.net but this server's config says "
            "chat.example.org") in text, run.output[-3000:]
    assert run.changed == 0
    assert host.server.ready()


def test_rotate_fails_when_qpq_ops_crashes_even_with_exit_1(host: Host) -> None:
    # A stand-in for a qpq-ops that died after changing things: a traceback, exit 1, no JSON.
    crashing = host.root / "opt/crashing/qpq-ops"
    crashing.parent.mkdir(parents=True, exist_ok=True)
    crashing.write_text("#!/bin/sh\necho 'Traceback (most recent call last):' >&2\nexit 1\n")
    crashing.chmod(0o755)
    run = run_playbook("rotate-keys.yml", host.work, day2_vars(
        host, qpq_rotate_kind="auth-token", qpq_rotate_qpq_ops="/opt/crashing/qpq-ops"))
    assert run.rc != 0
    assert "fatal: [localhost]" in run.output and "Run qpq-ops rotate" in run.output, \
        run.output[-3000:]


def test_redeploy_with_a_pinned_token_is_refused_after_a_rotation(host: Host) -> None:
    # The auth-token rotation above is in the audit log: the pinned token is the old one.
    assert host.token() != host.vars["qpq_server_auth_token"]
    env_before = (host.data_dir / ".env").read_bytes()
    run = run_playbook("deploy.yml", host.work, host.vars, tags="qpq_server")
    assert run.rc != 0
    assert "qpq_server_auth_token differs from the token `qpq-ops rotate auth-token` wrote" \
        in " ".join(run.output.split()), run.output[-3000:]
    assert run.changed == 0
    assert (host.data_dir / ".env").read_bytes() == env_before
    assert host.token() not in run.output
