"""Bad inputs stop deploy.yml in its first play, with a clear message, before any change."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.ansible.runner import deploy_vars, fake_proc, run_playbook

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
    "sysctl_value_not_a_number": ({"qpq_sysctl_settings": {"net.core.rmem_max": "big"}},
                                  "qpq_sysctl_settings[net.core.rmem_max] = big: expected"),
    "wheel_not_on_the_controller": ({"qpq_server_wheel": "/nonexistent/qpq-0.1.0-py3-none-any.whl"},
                                    "qpq_server_wheel must name an existing *.whl"),
    "prometheus_target_without_addresses": ({"qpq_prometheus_targets": [{"instance": "a"}]},
                                            "every qpq_prometheus_targets entry needs instance"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_stops_in_preflight_with_a_clear_message_and_no_change(
        case: str, good_vars: dict[str, Any], tmp_path: Path) -> None:
    overrides, message = BAD_INPUTS[case]
    extra = {**good_vars, **overrides}
    if overrides.get("qpq_server_domain", "") is None:
        del extra["qpq_server_domain"]
    run = run_playbook("deploy.yml", tmp_path / "work", extra)
    assert run.rc != 0
    assert message in " ".join(run.output.split()), run.output[-3000:]
    assert run.changed == 0
    assert "PLAY [Check the inputs of every qpq role]" in run.output
    assert "PLAY [Deploy the qpq server]" not in run.output
    assert not Path(good_vars["qpq_root"]).exists()


def test_kernel_values_that_differ_fail_the_sysctl_verification(
        good_vars: dict[str, Any], tmp_path: Path) -> None:
    fake_proc(Path(good_vars["qpq_sysctl_proc_root"]), {"net.core.rmem_max": 212992})
    run = run_playbook("deploy.yml", tmp_path / "work", good_vars, tags="qpq_sysctl")
    assert run.rc != 0
    assert ("net.core.rmem_max is 212992 in" in run.output
            and "but 26214400 is wanted" in " ".join(run.output.split())), run.output[-3000:]
    # The persistent file is still written: the next boot gets the right values.
    conf = Path(good_vars["qpq_root"]) / "etc" / "sysctl.d" / "99-qpq.conf"
    assert "net.core.rmem_max = 26214400" in conf.read_text().splitlines()


def test_check_mode_on_a_fresh_host_reports_changes_and_writes_nothing(
        good_vars: dict[str, Any], tmp_path: Path) -> None:
    run = run_playbook("deploy.yml", tmp_path / "work", good_vars, check=True)
    assert run.rc == 0, run.output[-4000:]
    assert run.changed > 0
    assert not Path(good_vars["qpq_root"]).exists()
