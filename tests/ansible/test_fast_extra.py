"""qpq_server_fast_extra: the role installs qpq[fast] (uvloop) by default, plain qpq when off,
and a hashed requirements file must then pin uvloop too."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from tests.ansible.runner import deploy_vars, fake_proc, run_playbook

pytestmark = pytest.mark.timeout(900)


def _has_uvloop(root: Path) -> bool:
    python = root / "opt/qpq/current/bin/python"
    return subprocess.run([str(python), "-c", "import uvloop"], capture_output=True,
                          timeout=60, check=False).returncode == 0


def test_the_fast_extra_is_installed_by_default_and_left_out_when_off(
        tmp_path: Path, qpq_wheel: Path, sysctl_settings: dict[str, int]) -> None:
    # A fresh default deploy's uvloop is checked on the deploy that tests/ansible/
    # test_deploy.py shares (test_the_fast_extra_is_installed_by_default): no install of
    # its own here. This root starts without the extra and gets it from the default.
    assert any(qpq_wheel.parent.glob("uvloop-*.whl"))  # the offline index has it
    proc = fake_proc(tmp_path / "proc", sysctl_settings)
    plain = tmp_path / "plain"
    off = run_playbook("deploy.yml", tmp_path / "work-plain",
                       {**deploy_vars(plain, proc, qpq_wheel), "qpq_server_fast_extra": False},
                       tags="qpq_server_install")
    assert off.rc == 0, off.output[-4000:]
    assert not _has_uvloop(plain)
    # Turning it on later (the default) reinstalls into the same version's venv (the
    # probe sees no uvloop).
    later = run_playbook("deploy.yml", tmp_path / "work-plain",
                         deploy_vars(plain, proc, qpq_wheel), tags="qpq_server_install")
    assert later.rc == 0, later.output[-4000:]
    assert _has_uvloop(plain)
    # That the probe then sees uvloop and a rerun installs nothing is the default deploy's
    # second run (tests/host: changed=0 with the extra on).


def test_hashed_requirements_without_uvloop_are_refused_when_the_extra_is_on(
        tmp_path: Path, qpq_wheel: Path, sysctl_settings: dict[str, int]) -> None:
    lines = []
    for wheel in sorted(qpq_wheel.parent.glob("*.whl")):
        name, version = wheel.name.split("-")[:2]
        if name != "uvloop":
            digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
            lines.append(f"{name.replace('_', '-')}=={version} --hash=sha256:{digest}")
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("\n".join(lines) + "\n")
    root = tmp_path / "root"
    extra = {**deploy_vars(root, fake_proc(tmp_path / "proc", sysctl_settings), qpq_wheel),
             "qpq_server_pip_requirements": str(requirements)}
    run = run_playbook("deploy.yml", tmp_path / "work", extra, tags="qpq_server_preflight")
    assert run.rc != 0
    assert "must pin qpq==0.1.0 and uvloop (qpq_server_fast_extra)" in " ".join(
        run.output.split())
    assert not root.exists()
