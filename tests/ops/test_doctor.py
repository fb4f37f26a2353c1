"""qpq-ops doctor against a real server, real Prometheus and fake /proc trees."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID
from typer.testing import CliRunner

from qpq_ops.capacity import CapacityInputs, plan
from qpq_ops.cli import app
from qpq_ops.deployment import Deployment, load_deployment
from qpq_ops.doctor import (
    CHECK_IDS,
    CheckState,
    DoctorInputs,
    exit_code_for,
    run_doctor,
    worst,
)
from qpq_ops.doctor.checks import check_clock, check_disk
from qpq_ops.doctor.clock import ClockReading, read_clock
from tests.helpers.ports import free_port
from tests.helpers.prometheus import ScrapeJob, running_prometheus
from tests.helpers.server import RunningServer, init_data_dir, running_server

runner = CliRunner()

GOOD_SYSCTL = {"net.core.rmem_max": 26214400, "net.core.wmem_max": 26214400,
               "net.core.rmem_default": 1048576, "net.core.wmem_default": 1048576}


def synced_clock() -> ClockReading:
    return ClockReading("test", True, 0.002)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with running_server(tmp_path_factory.mktemp("doctor")) as srv:
        yield srv


@pytest.fixture
def host(tmp_path: Path, server: RunningServer) -> dict[str, Path]:
    """Fake /proc/sys and /proc (server pid with good limits) and a fresh backup record."""
    proc_sys = tmp_path / "proc-sys"
    for key, value in {**GOOD_SYSCTL, "fs.nr_open": 1048576}.items():
        path = proc_sys.joinpath(*key.split("."))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{value}\n")
    proc = tmp_path / "proc"
    pid_dir = proc / str(server.process.pid)
    pid_dir.mkdir(parents=True)
    pid_dir.joinpath("limits").write_text(
        "Limit                     Soft Limit           Hard Limit           Units\n"
        "Max open files            65536                65536                files\n")
    textfile = tmp_path / "textfile"
    textfile.mkdir()
    record_backup(textfile, time.time() - 3600)
    return {"proc_sys": proc_sys, "proc": proc, "textfile": textfile}


def record_backup(textfile: Path, when: float) -> None:
    (textfile / "qpq_backup.prom").write_text(
        "# TYPE qpq_backup_last_success_timestamp_seconds gauge\n"
        f"qpq_backup_last_success_timestamp_seconds {when}\n")


def inputs(server: RunningServer, host: dict[str, Path], **kw: object) -> DoctorInputs:
    base = DoctorInputs(
        config_path=server.config_path, deployment=load_deployment(server.config_path),
        prometheus_url=None, plan=None,
        textfile_dir=host["textfile"], proc_sys=host["proc_sys"], proc=host["proc"],
        now=time.time(), clock=synced_clock,
    )
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def configured(deployment: Deployment, section: str, **values: str) -> Deployment:
    """`deployment` as if its config's [section] said `values`."""
    config = deployment.config
    part = dataclasses.replace(getattr(config, section), **values)
    return dataclasses.replace(deployment, config=dataclasses.replace(config, **{section: part}))


def by_id(results: list) -> dict:  # type: ignore[type-arg]
    return {r.id: r for r in results}


def make_cert(key_pem: Path, out: Path, days: float) -> None:
    """A self-signed cert for the server's own key, valid for `days` from now."""
    key = serialization.load_pem_private_key(key_pem.read_bytes(), password=None)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=400)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())  # type: ignore[arg-type]
    )
    out.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def test_healthy_box_passes_every_check(server: RunningServer, host: dict[str, Path]) -> None:
    results = run_doctor(inputs(server, host))
    assert [r.id for r in results] == list(CHECK_IDS)
    states = {r.id: r.state for r in results}
    assert states == {"sysctl": "ok", "nofile": "ok", "config": "ok", "readyz": "ok",
                      "tls_cert": "ok", "disk": states["disk"], "backup": "ok",
                      "clock": "ok", "prometheus": "skipped", "database": "skipped",
                      "federation": "skipped"}
    assert f"server pid {server.process.pid}" in by_id(results)["nofile"].detail
    assert 364 < by_id(results)["tls_cert"].value < 366
    assert worst(results) in ("ok", "warning")  # the host disk may be past 70 %


def test_cli_json_lists_every_check_and_uses_design_exit_codes(
        server: RunningServer, host: dict[str, Path]) -> None:
    result = runner.invoke(app, [
        "doctor", "--config", str(server.config_path), "--json", "--skip", "clock",
        "--textfile-dir", str(host["textfile"]), "--proc-sys", str(host["proc_sys"]),
        "--proc", str(host["proc"])])
    doc = json.loads(result.stdout)
    assert [c["id"] for c in doc["checks"]] == [i for i in CHECK_IDS if i != "clock"]
    assert set(doc["checks"][0]) == {"id", "title", "state", "detail", "fix", "value"}
    assert result.exit_code == exit_code_for(CheckState(doc["status"]))
    disk = next(c for c in doc["checks"] if c["id"] == "disk")
    if disk["state"] == "ok":
        assert (doc["status"], result.exit_code) == ("ok", 0)


def test_cli_table_shows_findings_and_fixes(server: RunningServer, tmp_path: Path) -> None:
    low = tmp_path / "sys"
    for key in GOOD_SYSCTL:
        path = low.joinpath(*key.split("."))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("212992\n")
    result = runner.invoke(app, ["doctor", "--config", str(server.config_path),
                                 "--proc-sys", str(low), "--textfile-dir", str(tmp_path)],
                           env={"COLUMNS": "300"})
    assert result.exit_code in (1, 2)
    for text in ("UDP buffers", "net.core.rmem_max = 212992 < 26214400",
                 "qpq-ops tune sysctl --write", "no backup recorded", "qpq-ops backup create"):
        assert text in result.stdout, text


def test_low_sysctl_and_limits_are_warnings_with_fixes(server: RunningServer,
                                                       host: dict[str, Path]) -> None:
    (host["proc_sys"] / "net" / "core" / "rmem_max").write_text("4194304\n")
    limits = host["proc"] / str(server.process.pid) / "limits"
    limits.write_text(limits.read_text().replace("65536                65536",
                                                 "1024                 4096 "))
    results = by_id(run_doctor(inputs(server, host)))
    assert results["sysctl"].state == "warning"
    assert "net.core.rmem_max = 4194304 < 26214400" in results["sysctl"].detail
    assert "sysctl -p" in results["sysctl"].fix
    assert results["nofile"].state == "warning"
    assert "qpq-ops tune ulimits" in results["nofile"].fix


def test_unreadable_sysctl_is_no_data(server: RunningServer, host: dict[str, Path],
                                      tmp_path: Path) -> None:
    results = by_id(run_doctor(inputs(server, host, proc_sys=tmp_path / "empty")))
    assert results["sysctl"].state == "no-data"


@pytest.mark.parametrize(("days", "state"), [(200, "ok"), (10, "warning"), (2, "critical"),
                                             (-2, "critical")])
def test_tls_certificate_expiry_thresholds(server: RunningServer, host: dict[str, Path],
                                           tmp_path: Path, days: float, state: str) -> None:
    cert = tmp_path / "cert.pem"
    make_cert(server.data_dir / "tls" / "key.pem", cert, days)
    deployment = configured(load_deployment(server.config_path), "server", tls_cert=str(cert))
    result = by_id(run_doctor(inputs(server, host, deployment=deployment)))["tls_cert"]
    if days == 200:
        # the file is fine, but the running server still serves its 365-day certificate
        assert result.state == "warning"
        assert "server serves a certificate expiring" in result.detail
        assert "kill -HUP" in result.fix
    else:
        assert result.state == state
        assert result.value == pytest.approx(days, abs=0.01)
        assert "qpq-ops rotate tls" in result.fix
    if days < 0:
        assert "expired" in result.detail


def test_tls_certificate_missing_or_garbage_is_critical(server: RunningServer,
                                                        host: dict[str, Path],
                                                        tmp_path: Path) -> None:
    deployment = load_deployment(server.config_path)
    missing = configured(deployment, "server", tls_cert=str(tmp_path / "nope.pem"))
    assert by_id(run_doctor(inputs(server, host, deployment=missing)))[
        "tls_cert"].state == "critical"
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a cert")
    bad = configured(deployment, "server", tls_cert=str(garbage))
    result = by_id(run_doctor(inputs(server, host, deployment=bad)))["tls_cert"]
    assert result.state == "critical" and "not a PEM certificate" in result.detail


@pytest.mark.parametrize(("age_h", "state"), [(1, "ok"), (30, "warning"), (100, "critical")])
def test_backup_age_thresholds(server: RunningServer, host: dict[str, Path], age_h: float,
                               state: str) -> None:
    record_backup(host["textfile"], time.time() - age_h * 3600)
    result = by_id(run_doctor(inputs(server, host)))["backup"]
    assert result.state == state
    assert f"{age_h:.1f} h ago" in result.detail


def test_no_backup_recorded_is_a_warning(server: RunningServer, host: dict[str, Path]) -> None:
    (host["textfile"] / "qpq_backup.prom").unlink()
    result = by_id(run_doctor(inputs(server, host)))["backup"]
    assert result.state == "warning" and "no backup recorded" in result.detail


def test_disk_against_the_capacity_plan(server: RunningServer, host: dict[str, Path]) -> None:
    free = shutil.disk_usage(server.data_dir).free

    def disk_with(retained_bytes: float) -> CheckState:
        # a day of 1,000 uploads (each input stays within the planner's bounds)
        p = plan(CapacityInputs(users=1, msgs_per_user_hour=0, avg_msg_bytes=1,
                                blob_uploads_per_day=1000,
                                avg_blob_mb=retained_bytes / 1e9, retention_days=1))
        return check_disk(inputs(server, host, plan=p)).state

    assert disk_with(free * 0.1) == "ok"
    assert disk_with(free * 0.9) == "warning"   # fits, but not with the 70 % headroom
    assert disk_with(free * 3) == "critical"    # the retained data does not fit


@pytest.mark.parametrize(("reading", "state"), [
    (ClockReading("t", True, 0.01), "ok"), (ClockReading("t", True, 0.5), "warning"),
    (ClockReading("t", True, 3.0), "critical"), (ClockReading("t", False, None), "warning"),
    (None, "skipped"),
])
def test_clock_offset_thresholds(server: RunningServer, host: dict[str, Path],
                                 reading: ClockReading | None, state: str) -> None:
    assert check_clock(inputs(server, host, clock=lambda: reading)).state == state


def test_this_hosts_clock_reading_is_well_formed() -> None:
    reading = read_clock()
    if reading is not None:
        assert reading.source in ("chronyc", "adjtimex")
        assert reading.synchronised or reading.offset_s is None


@pytest.fixture(scope="module")
def prometheus(server: RunningServer, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[tuple[str, int]]:
    """One Prometheus for the doctor's scrape checks: job qpq scrapes this server and a
    port nothing listens on. Yields its URL and that dead port."""
    dead = free_port()
    live = server.metrics_url.removeprefix("http://")
    with running_prometheus(tmp_path_factory.mktemp("doctor-prometheus"),
                            [ScrapeJob("qpq", [live, f"127.0.0.1:{dead}"])]) as prom:
        # both targets scraped once: the live one up, the dead one down
        prom.wait_for('up{job="qpq"}', lambda result: len(result) == 2)
        yield prom.url, dead


def test_prometheus_scraping_the_server_is_ok_and_absent_is_warning(
        server: RunningServer, host: dict[str, Path],
        prometheus: tuple[str, int]) -> None:
    url, _ = prometheus
    result = by_id(run_doctor(inputs(server, host, prometheus_url=url)))["prometheus"]
    assert result.state == "ok" and "'qpq'" in result.detail
    # a server whose metrics address no job scrapes
    elsewhere = configured(load_deployment(server.config_path), "metrics",
                           listen=f"127.0.0.1:{free_port()}")
    result = by_id(run_doctor(inputs(server, host, deployment=elsewhere,
                                     prometheus_url=url)))["prometheus"]
    assert result.state == "warning" and "no active target" in result.detail
    unreachable = f"http://127.0.0.1:{free_port()}"
    result = by_id(run_doctor(inputs(server, host, prometheus_url=unreachable)))["prometheus"]
    assert result.state == "no-data"


def test_prometheus_target_down_is_critical(server: RunningServer, host: dict[str, Path],
                                            prometheus: tuple[str, int]) -> None:
    # the deployment's metrics port is a target Prometheus finds down
    url, dead = prometheus
    deployment = configured(load_deployment(server.config_path), "metrics",
                            listen=f"127.0.0.1:{dead}")
    results = by_id(run_doctor(inputs(server, host, deployment=deployment,
                                      prometheus_url=url)))
    assert results["prometheus"].state == "critical"
    assert results["readyz"].state == "critical"


def test_invalid_config_is_critical(server: RunningServer, host: dict[str, Path],
                                    tmp_path: Path) -> None:
    data = tmp_path / "bad"
    config_path = init_data_dir(data, {"quic": {"max_connections": -5}})
    result = runner.invoke(app, ["doctor", "--config", str(config_path), "--json",
                                 "--proc-sys", str(host["proc_sys"]),
                                 "--textfile-dir", str(host["textfile"])])
    doc = json.loads(result.stdout)
    checks = {c["id"]: c for c in doc["checks"]}
    assert checks["config"]["state"] == "critical"
    assert "max_connections" in checks["config"]["detail"]
    assert checks["readyz"]["state"] == "critical"  # nothing runs there
    # the paths the server would use are unknown: those checks say so and do not guess
    assert checks["tls_cert"]["state"] == checks["disk"]["state"] == "skipped"
    assert "refuses the config" in checks["tls_cert"]["detail"]
    assert checks["sysctl"]["state"] == "ok"  # host checks still run
    assert result.exit_code == 2


def test_sighup_makes_the_server_serve_the_rotated_certificate(tmp_path: Path) -> None:
    with running_server(tmp_path) as srv:
        tls = srv.data_dir / "tls"
        make_cert(tls / "key.pem", tls / "cert.pem", 200)
        host = {"proc_sys": tmp_path, "proc": tmp_path, "textfile": tmp_path}
        before = by_id(run_doctor(inputs(srv, host)))["tls_cert"]
        assert before.state == "warning" and "kill -HUP" in before.fix
        srv.reload()  # returns once the server logged that it re-read the certificate
        after = by_id(run_doctor(inputs(srv, host)))["tls_cert"]
        assert after.state == "ok", after
        assert after.value == pytest.approx(200, abs=0.01)


@pytest.mark.parametrize(("args", "text"), [
    ([], "--config PATH is required"),
    (["--config", "/nonexistent/qpq-server.toml"], "cannot read /nonexistent/qpq-server.toml"),
    (["--config", "/"], "cannot read /: Is a directory"),
    (["--skip", "disks"], "--skip: unknown check 'disks'"),
    (["--timeout", "0"], "--timeout: must be greater than 0"),
])
def test_doctor_usage_errors_exit_64(server: RunningServer, args: list[str], text: str) -> None:
    if args and args[0] in ("--skip", "--timeout"):
        args = ["--config", str(server.config_path), *args]
    result = runner.invoke(app, ["doctor", *args], env={"QPQ_CONFIG": ""})
    assert result.exit_code == 64, result.output
    assert text in result.stderr


def test_doctor_bad_config_toml_and_bad_plan_exit_64(tmp_path: Path,
                                                     server: RunningServer) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\n")
    result = runner.invoke(app, ["doctor", "--config", str(bad)])
    assert result.exit_code == 64 and "is not valid TOML" in result.stderr
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text("users: -1\n")
    result = runner.invoke(app, ["doctor", "--config", str(server.config_path),
                                 "--plan", str(plan_file)])
    assert result.exit_code == 64 and "missing input(s)" in result.stderr


def test_qpq_config_environment_variable_names_the_config(server: RunningServer,
                                                          host: dict[str, Path]) -> None:
    result = runner.invoke(app, ["doctor", "--json", "--skip", "clock", "--proc-sys",
                                 str(host["proc_sys"]), "--textfile-dir", str(host["textfile"])],
                           env={"QPQ_CONFIG": str(server.config_path)})
    assert json.loads(result.stdout)["config"] == str(server.config_path)


def test_doctor_table_wraps_the_fix_and_prints_brackets_as_text(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from qpq_ops._console import out
    from qpq_ops.cli.doctor import doctor_table
    from qpq_ops.doctor.model import CheckResult, CheckState

    monkeypatch.setenv("COLUMNS", "80")
    long_path = "/srv/" + "very-long-directory-name/" * 4 + "qpq-server.toml"
    fix = f"qpq-ops backup create --config {long_path} --dest [backups]"
    out().print(doctor_table([CheckResult("backup", "Last backup", CheckState.WARNING,
                                          "no backup recorded [textfile]", fix)],
                             tmp_path / "qpq-server.toml"))
    text = capsys.readouterr().out
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "…" not in text  # wrapped, never cut: the command is copied from here
    assert "[backups]" in text and "[textfile]" in text  # data, not markup
    cells = "".join(line.split("│")[-2].strip() for line in text.splitlines()
                    if line.count("│") >= 5)
    assert long_path in cells
