"""Bad inputs stop deploy.yml in its first play, with a clear message, before any change.

(Check mode on a fresh host, which reports changes and writes nothing, runs on the systemd
host: tests/host/test_deploy_systemd.py.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.ansible.runner import BIN, deploy_vars, fake_proc, run_playbook

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def good_vars(tmp_path: Path, sysctl_settings: dict[str, int]) -> dict[str, Any]:
    # Preflight only checks that the wheel exists; nothing gets installed here.
    wheel = tmp_path / "wheels" / "qpq-0.1.0-py3-none-any.whl"
    wheel.parent.mkdir()
    wheel.write_bytes(b"")
    return deploy_vars(tmp_path / "root", fake_proc(tmp_path / "proc", sysctl_settings), wheel)


BAD_INPUTS = {
    "missing_domain": ({"qpq_server_domain": None}, "missing required arguments: qpq_server_domain"),
    "wrong_type": ({"qpq_server_quic_max_connections": "lots"},
                   "argument 'qpq_server_quic_max_connections' is of type str and we were unable "
                   "to convert to int"),
    "listen_without_port": ({"qpq_server_listen": "0.0.0.0"},
                            'qpq_server_listen must be HOST:PORT with a port up to 65535 '
                            '(got "0.0.0.0")'),
    "systemd_in_a_temp_root": ({"qpq_service_manager": "systemd"},
                               "systemd cannot manage a temporary root"),
    "qpq_ops_path_not_absolute": ({"qpq_sysctl_qpq_ops": "venv/bin/qpq-ops"},
                                  "must be absolute paths"),
    "ulimits_qpq_ops_path_not_absolute": ({"qpq_ulimits_qpq_ops": "qpq-ops"},
                                          "qpq_ulimits_qpq_ops must be an absolute path"),
    "wheel_not_on_the_controller": ({"qpq_server_wheel": "/nonexistent/qpq-0.1.0-py3-none-any.whl"},
                                    "qpq_server_wheel must name an existing *.whl"),
    "grafana_default_admin_password": ({"qpq_grafana_admin_password": "admin"},
                                       "qpq_grafana_admin_password (from the vault) at least 12"),
    "grafana_without_admin_password": ({"qpq_grafana_admin_password": None},
                                       "missing required arguments: qpq_grafana_admin_password"),
    "journal_size_not_a_size": ({"qpq_server_journal_max_use": "lots"},
                                "qpq_server_journal_max_use must be a size like 1G"),
    "prometheus_target_without_addresses": ({"qpq_prometheus_targets": [{"instance": "a"}]},
                                            "every qpq_prometheus_targets entry needs instance"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_stops_in_preflight_with_a_clear_message_and_no_change(
        case: str, good_vars: dict[str, Any], tmp_path: Path) -> None:
    overrides, message = BAD_INPUTS[case]
    extra = {**good_vars, **overrides}
    for name in [name for name, value in overrides.items() if value is None]:
        del extra[name]
    run = run_playbook("deploy.yml", tmp_path / "work", extra)
    assert run.rc != 0
    assert message in " ".join(run.output.split()), run.output[-3000:]
    assert run.changed == 0
    assert "PLAY [Check the inputs of every qpq role]" in run.output
    assert "PLAY [Deploy the qpq server]" not in run.output
    assert not Path(good_vars["qpq_root"]).exists()


def test_a_run_limited_by_tags_checks_the_roles_it_runs_once(
        good_vars: dict[str, Any], tmp_path: Path) -> None:
    # A bad input of a role the tags leave out does not stop the run...
    extra = {**good_vars, "qpq_grafana_admin_password": "admin"}
    run = run_playbook("deploy.yml", tmp_path / "work", extra, tags="qpq_backup_preflight")
    assert run.rc == 0, run.output[-3000:]
    checks = [task for task in run.task_headers() if " : Assert " in task]
    # ...and the selected role's checks run once, in the first play.
    assert checks and all(check.startswith("TASK [qpq_backup : ") for check in checks), checks
    assert len(set(checks)) == len(checks), checks
    # A step's tag selects its role: the server role's bad input stops the run.
    bad = {**good_vars, "qpq_server_listen": "0.0.0.0"}
    run = run_playbook("deploy.yml", tmp_path / "work", bad, tags="qpq_server_configure")
    assert run.rc != 0 and "qpq_server_listen must be HOST:PORT" in run.output, run.output[-3000:]
    assert "PLAY [Deploy the qpq server]" not in run.output


def test_a_role_run_on_its_own_checks_its_inputs(good_vars: dict[str, Any],
                                                tmp_path: Path) -> None:
    """Outside deploy.yml (no first play named it in qpq_inputs_checked) the role checks."""
    playbook = tmp_path / "sysctl-alone.yml"
    playbook.write_text("- name: The sysctl role alone\n"
                        "  hosts: qpq_servers\n"
                        "  gather_facts: false\n"
                        "  roles: [qpq_sysctl]\n")
    extra = {**good_vars, "qpq_sysctl_qpq_ops": "venv/bin/qpq-ops"}
    run = run_playbook(str(playbook), tmp_path / "work", extra)
    assert run.rc != 0
    assert "TASK [qpq_sysctl : Assert the root, drop-in, proc and qpq-ops paths" in run.output
    assert "must be absolute paths" in " ".join(run.output.split()), run.output[-3000:]
    assert run.changed == 0


def with_qpq_ops(root: Path) -> None:
    """This checkout's qpq-ops where the qpq_server role would install it (no pip run)."""
    venv_bin = root / "opt" / "qpq" / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "qpq-ops").symlink_to(BIN / "qpq-ops")


def test_kernel_values_below_qpq_ops_fail_the_sysctl_verification(
        good_vars: dict[str, Any], tmp_path: Path) -> None:
    fake_proc(Path(good_vars["qpq_sysctl_proc_root"]), {"net.core.rmem_max": 212992})
    with_qpq_ops(Path(good_vars["qpq_root"]))
    run = run_playbook("deploy.yml", tmp_path / "work", good_vars, tags="qpq_sysctl")
    assert run.rc != 0
    assert ("net.core.rmem_max is 212992 in" in run.output
            and "but 26214400 is wanted" in " ".join(run.output.split())), run.output[-3000:]
    # The persistent file is still written: the next boot gets the right values.
    conf = Path(good_vars["qpq_root"]) / "etc" / "sysctl.d" / "99-qpq.conf"
    assert "net.core.rmem_max = 26214400" in conf.read_text().splitlines()


def test_tuning_roles_without_qpq_ops_say_what_installs_it(
        good_vars: dict[str, Any], tmp_path: Path) -> None:
    run = run_playbook("deploy.yml", tmp_path / "work", good_vars, tags="qpq_sysctl")
    assert run.rc != 0
    assert ("qpq_sysctl runs `qpq-ops tune sysctl`, which the qpq_server role installs"
            in " ".join(run.output.split())), run.output[-3000:]
