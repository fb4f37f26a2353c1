"""deploy.yml rolls host by host and stops at a failed host; rotate-keys.yml gives every
server the same auth token. Several inventory names for this machine, each with its own
temporary root (connection local)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.ansible.runner import (
    BIN,
    deploy_vars,
    fake_proc,
    read_env,
    run_playbook,
)

pytestmark = pytest.mark.timeout(300)

SERVERS = ("qpq-a.example.org", "qpq-b.example.org")


def _two_hosts(tmp_path: Path, wheel: Path, settings: dict[str, int],
               **host_a: Any) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """deploy.yml's vars for SERVERS, each with its own root; `host_a` only for the first."""
    extra = deploy_vars(Path("/unused"), fake_proc(tmp_path / "proc", settings), wheel)
    shared = {key: extra.pop(key) for key in ("qpq_root", "qpq_server_pip_extra_args")}
    hosts = {name: {**shared, "qpq_root": str(tmp_path / name)} for name in SERVERS}
    hosts[SERVERS[0]].update(host_a)
    return extra, hosts


def test_a_host_failing_mid_roll_stops_it_before_the_next_host(
        tmp_path: Path, qpq_wheel: Path, sysctl_settings: dict[str, int]) -> None:
    # The first host's pip cannot reach any index: its install fails after the checks.
    extra, hosts = _two_hosts(tmp_path, qpq_wheel, sysctl_settings,
                              qpq_server_pip_extra_args="--no-index --find-links /nonexistent")
    run = run_playbook("deploy.yml", tmp_path / "work", extra, servers=SERVERS,
                       host_vars=hosts)
    assert run.rc != 0
    roll = run.output.split("PLAY [Deploy the qpq server]", 1)[1].split("PLAY RECAP", 1)[0]
    assert f"fatal: [{SERVERS[0]}]" in roll, run.output[-3000:]
    assert "Install qpq into the virtualenv" in roll
    assert f"[{SERVERS[1]}]" not in roll  # the second batch never started
    assert not (tmp_path / SERVERS[1]).exists()
    assert "PLAY [Deploy Prometheus" not in run.output


def test_one_hosts_bad_input_stops_every_host_before_any_change(
        tmp_path: Path, qpq_wheel: Path, sysctl_settings: dict[str, int]) -> None:
    extra, hosts = _two_hosts(tmp_path, qpq_wheel, sysctl_settings)
    hosts[SERVERS[1]]["qpq_server_listen"] = "no-port"
    del extra["qpq_server_listen"]
    hosts[SERVERS[0]]["qpq_server_listen"] = "127.0.0.1:7443"
    run = run_playbook("deploy.yml", tmp_path / "work", extra, servers=SERVERS,
                       host_vars=hosts)
    assert run.rc != 0
    assert "qpq_server_listen must be HOST:PORT" in " ".join(run.output.split())
    assert "PLAY [Deploy the qpq server]" not in run.output
    assert not any((tmp_path / name).exists() for name in SERVERS)


def _initialised_root(root: Path, domain: str) -> Path:
    """A deployed-looking root: qpq-server init's data dir and qpq-ops where the role looks."""
    data = root / "var/lib/qpq"
    subprocess.run([str(BIN / "qpq-server"), "init", "--data-dir", str(data), "--domain", domain],
                   check=True, capture_output=True, timeout=60)
    venv_bin = root / "opt/qpq/venv/bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "qpq-ops").symlink_to(BIN / "qpq-ops")
    return data / ".env"


def _rotate(tmp_path: Path, roots: dict[str, Path], **extra: Any) -> Any:
    return run_playbook(
        "rotate-keys.yml", tmp_path / "work",
        {"qpq_service_manager": "none", "ansible_become": False,
         "qpq_rotate_kind": "auth-token", **extra},
        servers=SERVERS, host_vars={name: {"qpq_root": str(root)} for name, root in roots.items()})


def test_rotating_the_auth_token_gives_every_server_one_new_token(tmp_path: Path) -> None:
    roots = {name: tmp_path / name for name in SERVERS}
    envs = {name: _initialised_root(root, name) for name, root in roots.items()}
    before = {name: read_env(env)["QPQ_AUTH_TOKEN"] for name, env in envs.items()}
    assert len(set(before.values())) == 2  # init made one per host

    run = _rotate(tmp_path, roots)
    assert run.rc == 0, run.output[-4000:]
    after = {name: read_env(env) for name, env in envs.items()}
    tokens = {env["QPQ_AUTH_TOKEN"] for env in after.values()}
    assert len(tokens) == 1 and not tokens & set(before.values())
    for name, env in after.items():
        assert env["QPQ_AUTH_TOKEN_PREVIOUS"] == before[name]  # each keeps its grace token
    (token,) = tokens
    assert token not in run.output
    assert "Assert one token fingerprint across the cluster" in run.output


def test_a_vault_token_is_what_every_server_rotates_to(tmp_path: Path) -> None:
    roots = {name: tmp_path / name for name in SERVERS}
    envs = [_initialised_root(root, name) for name, root in roots.items()]
    vault_token = "vault-cluster-token-" + "v" * 24
    run = _rotate(tmp_path, roots, qpq_rotate_auth_token=vault_token)
    assert run.rc == 0, run.output[-4000:]
    assert [read_env(env)["QPQ_AUTH_TOKEN"] for env in envs] == [vault_token, vault_token]
    assert vault_token not in run.output


def test_a_short_vault_token_is_refused_before_any_rotation(tmp_path: Path) -> None:
    roots = {name: tmp_path / name for name in SERVERS}
    envs = [_initialised_root(root, name) for name, root in roots.items()]
    before = [env.read_text() for env in envs]
    run = _rotate(tmp_path, roots, qpq_rotate_auth_token="too-short")
    assert run.rc != 0
    assert "qpq_rotate_auth_token must be empty" in " ".join(run.output.split())
    assert "too-short" not in run.output
    assert [env.read_text() for env in envs] == before
