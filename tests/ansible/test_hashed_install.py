"""qpq_server_pip_requirements: pip installs in --require-hashes mode, so a dependency whose
hash differs from the pinned one is refused and the install never switches `current`."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from tests.ansible.runner import PlaybookRun, deploy_vars, fake_proc, run_playbook

pytestmark = pytest.mark.timeout(600)


def hashed_requirements(wheelhouse: Path, tamper: str | None = None) -> str:
    """`name==version --hash=sha256:...` for every wheel (one `tamper`ed when named)."""
    lines = []
    for wheel in sorted(wheelhouse.glob("*.whl")):
        name, version = wheel.name.split("-")[:2]
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if name == tamper:
            digest = "0" * 64
        lines.append(f"{name.replace('_', '-')}=={version} --hash=sha256:{digest}")
    return "\n".join(lines) + "\n"


def _deploy(tmp_path: Path, wheel: Path, settings: dict[str, int],
            requirements: str, tags: str = "qpq_server_install") -> tuple[PlaybookRun, Path]:
    """The server role's install step only (preflight always runs): what these tests check
    is decided there, and configuring and starting the server would add minutes."""
    req = tmp_path / "requirements.txt"
    req.write_text(requirements)
    root = tmp_path / "root"
    extra = {**deploy_vars(root, fake_proc(tmp_path / "proc", settings), wheel),
             "qpq_server_pip_requirements": str(req)}
    return run_playbook("deploy.yml", tmp_path / "work", extra, tags=tags), root


def test_a_dependency_with_another_hash_is_refused_and_nothing_is_switched(
        tmp_path: Path, qpq_wheel: Path, sysctl_settings: dict[str, int]) -> None:
    run, root = _deploy(tmp_path, qpq_wheel, sysctl_settings,
                        hashed_requirements(qpq_wheel.parent, tamper="aioquic"))
    assert run.rc != 0
    assert "THESE PACKAGES DO NOT MATCH THE HASHES" in run.output, run.output[-3000:]
    assert not (root / "opt/qpq/current").is_symlink()


def test_hashed_requirements_install_the_pinned_wheels(
        tmp_path: Path, qpq_wheel: Path, sysctl_settings: dict[str, int]) -> None:
    requirements = hashed_requirements(qpq_wheel.parent)
    assert re.search(r"(?m)^qpq==0\.1\.0 --hash=sha256:[0-9a-f]{64}$", requirements)
    run, root = _deploy(tmp_path, qpq_wheel, sysctl_settings, requirements)
    assert run.rc == 0, run.output[-4000:]
    assert (root / "opt/qpq/requirements-0.1.0.txt").read_text() == requirements
    assert (root / "opt/qpq/current").readlink() == Path("venvs/0.1.0")
    assert (root / "opt/qpq/current/bin/qpq-server").exists()


def test_requirements_without_this_version_are_refused_before_any_change(
        tmp_path: Path, qpq_wheel: Path, sysctl_settings: dict[str, int]) -> None:
    run, root = _deploy(tmp_path, qpq_wheel, sysctl_settings,
                        "qpq==0.0.9 --hash=sha256:" + "1" * 64 + "\n",
                        tags="qpq_server_preflight")
    assert run.rc != 0
    assert "must pin qpq==0.1.0" in " ".join(run.output.split())
    assert not root.exists()
