"""The ACME deploy hook qpq_server installs: run as certbot would (RENEWED_LINEAGE), it puts
the renewed certificate in place and the running server reloads (SIGHUP) onto it."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import pytest

from qpq_server.tls import write_self_signed
from tests.ansible.runner import (
    AUTH_TOKEN,
    DeployedServer,
    deploy_vars,
    fake_proc,
    run_playbook,
)

pytestmark = pytest.mark.timeout(600)

HOOK = "/etc/letsencrypt/renewal-hooks/deploy/qpq-server"


async def _ping(server: DeployedServer, ca: Path) -> bool:
    async with server.connect(AUTH_TOKEN, ca=ca) as conn:
        return bool((await conn.call("ping"))["ok"])


def test_the_hook_installs_a_renewed_certificate_and_reloads_the_server(
        tmp_path: Path, qpq_wheel: Path, sysctl_settings: dict[str, int]) -> None:
    root = tmp_path / "root"
    extra = {**deploy_vars(root, fake_proc(tmp_path / "proc", sysctl_settings), qpq_wheel),
             "qpq_server_acme_hook": HOOK}
    run = run_playbook("deploy.yml", tmp_path / "work", extra, tags="qpq_server")
    assert run.rc == 0, run.output[-4000:]
    hook = root / HOOK.lstrip("/")
    assert os.access(hook, os.X_OK)
    subprocess.run(["sh", "-n", str(hook)], check=True, timeout=10)

    # What certbot leaves in /etc/letsencrypt/live/DOMAIN/ after a renewal.
    lineage = tmp_path / "live" / "chat.example.org"
    write_self_signed(lineage / "fullchain.pem", lineage / "privkey.pem", "chat.example.org")
    server = DeployedServer(root, extra["qpq_server_metrics_listen"], tmp_path / "server.log")
    server.start()
    try:
        running = server.running
        assert running is not None
        reloads = running.reloads()
        done = subprocess.run([str(hook)], env={"PATH": "/usr/bin:/bin",
                                                "RENEWED_LINEAGE": str(lineage)},
                              capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        running.wait_reloaded(reloads)
        cert = root / "var/lib/qpq/tls/cert.pem"
        assert cert.read_bytes() == (lineage / "fullchain.pem").read_bytes()
        assert asyncio.run(_ping(server, lineage / "fullchain.pem"))  # served now
    finally:
        server.stop()


def test_the_hook_without_a_lineage_fails_with_one_clear_line(tmp_path: Path) -> None:
    hook = tmp_path / "hook"
    template = Path(__file__).resolve().parents[2] / \
        "playbooks/roles/qpq_server/templates/qpq-acme-deploy-hook.j2"
    hook.write_text(template.read_text().replace("{{ ansible_managed }}", "")
                    .replace("{{ _qpq_server_bin }}", "/nonexistent")
                    .replace("{{ _qpq_server_config }}", "/nonexistent.toml"))
    done = subprocess.run(["sh", str(hook)], env={"PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=10, check=False)
    assert done.returncode != 0
    assert "RENEWED_LINEAGE must name the renewed certificate directory" in done.stderr
