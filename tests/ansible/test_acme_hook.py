"""The ACME deploy hook qpq_server installs, refusing to run without RENEWED_LINEAGE.

That the deployed hook, run as certbot would, puts the renewed certificate in place and the
running unit reloads onto it (same PID) is proved on a real systemd host:
tests/host/test_deploy_systemd.py::test_the_acme_hook_reloads_the_unit_onto_a_renewed_certificate."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)


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
