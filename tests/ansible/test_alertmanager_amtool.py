"""The qpq_prometheus role's alertmanager.yml, checked by the real amtool and Alertmanager.

The role's own template, defaults and vars are rendered by Ansible; then `amtool
check-config` accepts it, `amtool config routes test` shows where a critical qpq alert
goes, and a real Alertmanager (Debian's prometheus-alertmanager) given a critical and a
warning of the same trigger and instance reports the warning inhibited.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.ansible.runner import ROLES, run_playbook
from tests.helpers.ports import free_port

pytestmark = pytest.mark.timeout(300)

ALERTMANAGER = "/usr/bin/prometheus-alertmanager"
RECEIVERS = [{"name": "pager", "webhook_configs": [{"url": "http://127.0.0.1:9/qpq"}]}]


def _amtool() -> str:
    path = shutil.which("amtool")
    if path is None:
        pytest.fail("amtool is missing: run `make sysdeps` (Debian package "
                    "prometheus-alertmanager)")
    return path


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """alertmanager.yml rendered from the role (validated by amtool, as the role does)."""
    work = tmp_path_factory.mktemp("alertmanager")
    out = work / "alertmanager.yml"
    role = ROLES / "qpq_prometheus"
    playbook = work / "render.yml"
    playbook.write_text(yaml.safe_dump([{
        "name": "Render the role's alertmanager.yml", "hosts": "qpq_monitoring",
        "gather_facts": False,
        "vars_files": [str(role / "defaults/main.yml"), str(role / "vars/main.yml")],
        "tasks": [{"name": "Render", "ansible.builtin.template": {
            "src": str(role / "templates/alertmanager.yml.j2"), "dest": str(out),
            "mode": "0640", "validate": f"{_amtool()} check-config %s"}}],
    }]))
    run = run_playbook(str(playbook), work, {
        "qpq_prometheus_alertmanager_receivers": RECEIVERS,
        "qpq_prometheus_alertmanager_receiver": "pager"})
    assert run.rc == 0, run.output[-3000:]
    return out


def test_amtool_check_config_accepts_the_rendered_file(config: Path) -> None:
    done = subprocess.run([_amtool(), "check-config", str(config)], capture_output=True,
                          text=True, timeout=30, check=False)
    print(done.stdout)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout
    assert " - 2 inhibit rules" in done.stdout and " - 1 receivers" in done.stdout


def test_amtool_routes_a_critical_qpq_alert_to_the_receiver(config: Path) -> None:
    labels = ["alertname=qpq_cpu_critical", "severity=critical", "trigger=cpu",
              "instance=qpq-1"]
    done = subprocess.run([_amtool(), "config", "routes", "test", "--verify.receivers=pager",
                           f"--config.file={config}", *labels],
                          capture_output=True, text=True, timeout=30, check=False)
    print(done.stdout)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == "pager"
    tree = subprocess.run([_amtool(), "config", "routes", "show", f"--config.file={config}"],
                          capture_output=True, text=True, timeout=30, check=True).stdout
    print(tree)
    assert "receiver: pager" in tree


@pytest.fixture(scope="module")
def alertmanager(config: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Alertmanager on a free loopback port, no cluster peering, stopped after."""
    if not Path(ALERTMANAGER).is_file():
        pytest.fail(f"{ALERTMANAGER} is missing: run `make sysdeps` (prometheus-alertmanager)")
    url = f"http://127.0.0.1:{free_port()}"
    work = tmp_path_factory.mktemp("am-data")
    proc = subprocess.Popen(
        [ALERTMANAGER, f"--config.file={config}", f"--storage.path={work}",
         f"--web.listen-address={url.removeprefix('http://')}", "--cluster.listen-address="],
        stdout=subprocess.DEVNULL, stderr=(work / "alertmanager.log").open("wb"))
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, (work / "alertmanager.log").read_text()
            try:
                if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "Alertmanager not ready in 30 s"
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _add(url: str, *labels: str) -> None:
    subprocess.run([_amtool(), "alert", "add", f"--alertmanager.url={url}", *labels],
                   capture_output=True, text=True, timeout=30, check=True)


def _alerts(url: str) -> dict[str, Any]:
    """alertname -> alert, from `amtool alert query` (inhibited ones included)."""
    out = subprocess.run([_amtool(), "alert", "query", "--inhibited", "--active",
                          "-o", "json", f"--alertmanager.url={url}"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    return {a["labels"]["alertname"]: a for a in json.loads(out)}


def test_a_critical_trigger_inhibits_its_warning_on_the_same_instance(alertmanager: str) -> None:
    _add(alertmanager, "alertname=qpq_cpu_critical", "severity=critical", "trigger=cpu",
         "instance=qpq-1")
    _add(alertmanager, "alertname=qpq_cpu_warning", "severity=warning", "trigger=cpu",
         "instance=qpq-1")
    # Control: another trigger's warning on that instance is not inhibited.
    _add(alertmanager, "alertname=qpq_memory_warning", "severity=warning", "trigger=memory",
         "instance=qpq-1")
    deadline = time.monotonic() + 30
    while True:
        alerts = _alerts(alertmanager)
        if alerts.get("qpq_cpu_warning", {}).get("status", {}).get("inhibitedBy"):
            break
        assert time.monotonic() < deadline, alerts
        time.sleep(0.3)
    print(json.dumps({name: a["status"] for name, a in alerts.items()}, indent=1))
    assert alerts["qpq_cpu_warning"]["status"]["state"] == "suppressed"
    assert alerts["qpq_cpu_critical"]["status"]["state"] == "active"
    assert alerts["qpq_memory_warning"]["status"]["state"] == "active"
