"""docker-compose.prod.yml: the network-namespace holder and the scheduled backup job.

No Docker daemon runs where these tests run, so the containers are not started: the
resolved file (`docker-compose config`) is checked for the structure that makes a server
restart leave node_exporter alone, and the backup job's own script is run for real with
this checkout's qpq-ops against a real data dir.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.backup.support import ops, with_database
from tests.bundle.test_compose import _config, _env_example, _project

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def resolved(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    env = _env_example(repo) | {"QPQ_DOMAIN": "chat.example.org"}
    result = _config(_project(repo, tmp_path_factory.mktemp("compose"), env))
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = yaml.safe_load(result.stdout)
    return data


def _depends(service: dict[str, Any]) -> set[str]:
    depends = service.get("depends_on", {})
    return set(depends if isinstance(depends, list) else depends.keys())


def test_server_and_node_exporter_join_the_holders_namespace(
        resolved: dict[str, Any], repo: Path) -> None:
    services = resolved["services"]
    holder = services["qpq-netns"]
    assert holder["image"].startswith("registry.k8s.io/pause:")
    assert not _depends(holder)  # nothing it waits for, nothing that restarts it
    for name in ("qpq-server", "node-exporter"):
        assert services[name]["network_mode"] == "service:qpq-netns", name
        assert "ports" not in services[name] and "networks" not in services[name]
        assert "qpq-netns" in _depends(services[name])
    # Restarting or recreating qpq-server touches nothing that depends only on the holder.
    assert "qpq-server" not in _depends(services["node-exporter"])
    # The holder publishes QUIC and carries the server's name on the compose network,
    # which is what prometheus/prometheus.yml scrapes (server and node_exporter).
    assert holder["ports"] == [{"mode": "ingress", "host_ip": "0.0.0.0", "target": 7000,
                                "published": 7000, "protocol": "udp"}] or \
        holder["ports"] == ["0.0.0.0:7000:7000/udp"]
    assert holder["networks"]["default"]["aliases"] == ["qpq-server"]
    scrape = yaml.safe_load((repo / "prometheus/prometheus.yml").read_text())
    targets = {job["job_name"]: [t for c in job["static_configs"] for t in c["targets"]]
               for job in scrape["scrape_configs"]}
    assert targets["qpq"] == ["qpq-server:9090"] and targets["node"] == ["qpq-server:9100"]
    assert {"9090", "9100"} <= {str(p) for p in holder["expose"]}


def test_the_backup_job_runs_as_the_server_image_without_network(
        resolved: dict[str, Any]) -> None:
    services = resolved["services"]
    backup, server = services["qpq-backup"], services["qpq-server"]
    assert backup["image"] == server["image"] and "build" not in backup
    assert backup["network_mode"] == "none"
    assert "user" not in backup  # the image's non-root user, as the server
    volumes = {v.split(":")[0]: v.split(":")[1] for v in backup["volumes"]}
    assert volumes == {"qpq-data": "/data", "qpq-backups": "/backups",
                       "qpq-backup-metrics": "/var/lib/qpq-backup"}
    assert backup["environment"] == {"QPQ_BACKUP_INTERVAL": "24h", "QPQ_BACKUP_KEEP": "7",
                                     "QPQ_BACKUP_KEEP_DAILY": "14"}
    # node_exporter's textfile collector reads the metric the job writes.
    exporter = services["node-exporter"]
    assert "--collector.textfile.directory=/var/lib/qpq-backup" in exporter["command"]
    assert "qpq-backup-metrics:/var/lib/qpq-backup:ro" in exporter["volumes"]
    assert {"qpq-backups", "qpq-backup-metrics"} <= set(resolved["volumes"])


def test_the_image_owns_the_backup_volume_paths_for_its_user(repo: Path) -> None:
    """A new named volume takes the ownership of its directory in the image."""
    text = " ".join((repo / "Dockerfile").read_text().split())
    assert "chown qpq:qpq /data /backups /var/lib/qpq-backup" in text


def _script(resolved: dict[str, Any]) -> str:
    service = resolved["services"]["qpq-backup"]
    assert service["entrypoint"] == ["/bin/sh", "-c"]
    (text,) = service["command"]
    return str(text).replace("$$", "$")  # compose's escape for a literal $


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    subprocess.run([BIN / "qpq-server", "init", "--data-dir", data, "--domain", "example.org"],
                   check=True, capture_output=True, timeout=60)
    with_database(data / "qpq-server.toml")
    return data


def _env(data: Path, interval: str) -> dict[str, str]:
    return {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(data.parent),
            "QPQ_BACKUP_INTERVAL": interval, "QPQ_CONFIG": str(data / "qpq-server.toml"),
            "QPQ_BACKUP_DIR": str(data.parent / "backups"),
            "QPQ_BACKUP_METRICS_DIR": str(data.parent / "metrics")}


def _archives(data: Path) -> list[Path]:
    found = (data.parent / "backups").glob("qpq-backup-*.tar")
    return sorted(found) if (data.parent / "backups").is_dir() else []


def _verify(archive: Path, data: Path) -> int:
    """`qpq-ops backup verify`, opening the archived database with the server's key."""
    return ops("backup", "verify", archive, "--config", data / "qpq-server.toml").exit_code


def test_once_makes_one_archive_that_verifies_and_the_metric(
        resolved: dict[str, Any], data_dir: Path) -> None:
    (data_dir.parent / "metrics").mkdir()
    done = subprocess.run(["sh", "-c", _script(resolved)], env=_env(data_dir, "once"),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    (archive,) = _archives(data_dir)
    assert _verify(archive, data_dir) == 0
    metric = (data_dir.parent / "metrics" / "qpq_backup.prom").read_text()
    assert "qpq_backup_last_success_timestamp_seconds" in metric


def test_the_loop_backs_up_again_after_the_interval(
        resolved: dict[str, Any], data_dir: Path) -> None:
    (data_dir.parent / "metrics").mkdir()
    loop = subprocess.Popen(["sh", "-c", _script(resolved)], env=_env(data_dir, "1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while len(_archives(data_dir)) < 2:
            assert loop.poll() is None, loop.communicate()
            assert time.monotonic() < deadline, "no second backup within 90 s"
            time.sleep(0.2)
    finally:
        os.killpg(loop.pid, signal.SIGTERM)
        loop.communicate(timeout=30)
    assert [_verify(a, data_dir) for a in _archives(data_dir)[:2]] == [0, 0]


def test_the_loop_waits_for_the_server_to_write_its_config(
        resolved: dict[str, Any], tmp_path: Path) -> None:
    missing = tmp_path / "not-yet"
    loop = subprocess.Popen(["sh", "-c", _script(resolved)], env=_env(missing, "30"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            loop.wait(timeout=2)  # still waiting, not crashed
    finally:
        os.killpg(loop.pid, signal.SIGTERM)
        _, err = loop.communicate(timeout=30)
    assert "qpq-server's first start writes it" in err


@pytest.mark.parametrize("interval", ["", "soon", "1h30m", "-5", "1.5.2", "h"])
def test_a_bad_interval_is_refused_with_one_line(
        resolved: dict[str, Any], tmp_path: Path, interval: str) -> None:
    done = subprocess.run(["sh", "-c", _script(resolved)],
                          env=_env(tmp_path / "data", interval),
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 64
    assert done.stderr.count("\n") == 1
    assert f"QPQ_BACKUP_INTERVAL={interval} is not 'once' or a sleep(1) interval" in done.stderr
    assert not (tmp_path / "backups").exists()
