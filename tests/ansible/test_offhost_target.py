"""qpq_backup_offhost_target must be a path on the host or an rsync [user@]host:path; the
copy itself runs for real in tests/host (rsync to a local target, verified there)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.ansible.runner import deploy_vars, fake_proc, run_playbook

pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize("target", ["backups/qpq/", "~/qpq", "vault.example.org/srv"])
def test_a_target_that_is_neither_a_path_nor_host_path_is_refused_before_any_change(
        tmp_path: Path, qpq_wheel: Path, sysctl_settings: dict[str, int], target: str) -> None:
    root = tmp_path / "root"
    extra = {**deploy_vars(root, fake_proc(tmp_path / "proc", sysctl_settings), qpq_wheel),
             "qpq_backup_offhost_target": target}
    run = run_playbook("deploy.yml", tmp_path / "work", extra, tags="qpq_backup_preflight")
    assert run.rc != 0
    assert ("qpq_backup_offhost_target an rsync destination (an absolute path or "
            "[user@]host:path)") in " ".join(run.output.split()), run.output[-3000:]
    assert not root.exists()
