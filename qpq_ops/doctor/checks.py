"""The doctor's checks: each reads one thing and returns one `CheckResult` with its fix.

Nothing here changes the host. Checks that need a source the operator did not give
(`--prometheus-url`, `--plan`) or that the host cannot answer are `skipped`, which never
fails the run; a source that was asked for but does not answer is no-data or worse.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import httpx
from cryptography import x509

from qpq_ops.capacity import CapacityPlan
from qpq_ops.deployment import Deployment
from qpq_ops.doctor.clock import ClockReading, read_clock
from qpq_ops.doctor.federation import federation_results
from qpq_ops.doctor.model import CheckResult, CheckState
from qpq_ops.errors import ParseError, SourceError
from qpq_ops.evaluate.exposition import parse
from qpq_ops.evaluate.prometheus_client import PrometheusQuerier
from qpq_ops.triggers import (
    BACKUP_CRITICAL_AGE_S,
    BACKUP_MAX_AGE_S,
    TLS_EXPIRY_CRITICAL_S,
    TLS_EXPIRY_WARNING_S,
    get_trigger,
)
from qpq_ops.tuning import CheckState as TuneState
from qpq_ops.tuning import SettingCheck, check_nofile, check_sysctl
from qpq_server.secrets import read_env_file

__all__ = ["CHECKS", "CHECK_IDS", "DoctorInputs"]

DAY = 86_400.0
# The thresholds the alerts use (qpq_ops/triggers.py), so doctor and alerts agree.
CERT_WARNING_DAYS = TLS_EXPIRY_WARNING_S / DAY
CERT_CRITICAL_DAYS = TLS_EXPIRY_CRITICAL_S / DAY
CLOCK_WARNING_S = 0.1
CLOCK_CRITICAL_S = 1.0
BACKUP_FILE = "qpq_backup.prom"
BACKUP_METRIC = "qpq_backup_last_success_timestamp_seconds"


@dataclass(frozen=True)
class DoctorInputs:
    config_path: Path
    deployment: Deployment | None
    """None when qpq-server would refuse the config: the config check says why, and the
    checks that need its paths say they cannot tell."""
    prometheus_url: str | None
    plan: CapacityPlan | None
    textfile_dir: Path
    proc_sys: Path = Path("/proc/sys")
    proc: Path = Path("/proc")
    timeout: float = 5.0
    now: float = 0.0
    backup_warning_age_s: float = float(BACKUP_MAX_AGE_S)
    backup_critical_age_s: float = float(BACKUP_CRITICAL_AGE_S)
    clock: Callable[[], ClockReading | None] = read_clock
    skip: frozenset[str] = frozenset()


def _tune_result(check_id: str, title: str, checks: list[SettingCheck],
                 what: str) -> CheckResult:
    below = [c for c in checks if c.state is TuneState.BELOW]
    unknown = [c for c in checks if c.state is TuneState.UNKNOWN]
    if below:
        detail = ", ".join(f"{c.name} = {c.live} < {c.recommended}" for c in below)
        return CheckResult(check_id, title, CheckState.WARNING, detail, below[0].fix)
    if unknown:
        return CheckResult(check_id, title, CheckState.NO_DATA,
                           "cannot read " + ", ".join(c.name for c in unknown), unknown[0].fix)
    return CheckResult(check_id, title, CheckState.OK, f"{what} at or above the guide's values")


def check_sysctl_values(inputs: DoctorInputs) -> CheckResult:
    return _tune_result("sysctl", "UDP buffers (sysctl)", check_sysctl(inputs.proc_sys),
                        "net.core.{r,w}mem_{max,default}")


def _config_refused(check_id: str, title: str,
                    detail: str = "cannot tell: qpq-server refuses the config",
                    state: CheckState = CheckState.SKIPPED) -> CheckResult:
    """For a check that needs the config's paths when qpq-server refuses the config."""
    return CheckResult(check_id, title, state, f"{detail} (see the config check)",
                       "fix the config first")


def _server_pid(deployment: Deployment | None, proc: Path) -> int | None:
    if deployment is None:
        return None
    try:
        pid = int(deployment.pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if (proc / str(pid)).is_dir() else None


def check_open_files(inputs: DoctorInputs) -> CheckResult:
    pid = _server_pid(inputs.deployment, inputs.proc)
    result = _tune_result("nofile", "Open-files limit",
                          check_nofile(pid, inputs.proc, proc_sys=inputs.proc_sys),
                          "soft and hard limits")
    if pid is None:
        return CheckResult(result.id, result.title, result.state,
                           result.detail + " (server not running: checked qpq-ops itself)",
                           result.fix)
    return CheckResult(result.id, result.title, result.state,
                       f"server pid {pid}: {result.detail}", result.fix)


def check_config(inputs: DoctorInputs) -> CheckResult:
    title = "Config (qpq-server check-config)"
    binary = shutil.which("qpq-server") or str(Path(sys.executable).parent / "qpq-server")
    if not Path(binary).exists():
        return CheckResult("config", title, CheckState.SKIPPED, "qpq-server not installed here")
    try:
        out = subprocess.run([binary, "check-config", str(inputs.config_path)],
                             capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return CheckResult("config", title, CheckState.NO_DATA, f"check-config failed: {exc}")
    if out.returncode == 0:
        return CheckResult("config", title, CheckState.OK, "valid")
    problems = [line for line in out.stderr.splitlines() if line.strip()]
    first = problems[0] if problems else f"exit {out.returncode}"
    more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
    return CheckResult("config", title, CheckState.CRITICAL, first + more,
                       f"qpq-server check-config {inputs.config_path}")


def check_readyz(inputs: DoctorInputs) -> CheckResult:
    title = "Server ready (/readyz)"
    if inputs.deployment is None:  # it cannot (re)start with this config
        return _config_refused("readyz", title, "qpq-server refuses this config, so it "
                               "cannot start", CheckState.CRITICAL)
    url = inputs.deployment.metrics_url + "/readyz"
    fix = "start it (systemctl start qpq-server) and read its log (journalctl -u qpq-server)"
    try:
        response = httpx.get(url, timeout=inputs.timeout)
    except httpx.HTTPError as exc:
        return CheckResult("readyz", title, CheckState.CRITICAL,
                           f"{url} unreachable ({type(exc).__name__})", fix)
    if response.status_code == 200:
        return CheckResult("readyz", title, CheckState.OK, f"{url} answered 200")
    return CheckResult("readyz", title, CheckState.CRITICAL,
                       f"{url} answered HTTP {response.status_code}", fix)


def _served_expiry(deployment: Deployment, timeout: float) -> float | None:
    try:
        response = httpx.get(deployment.metrics_url + "/metrics", timeout=timeout)
        series = parse(response.text).series("qpq_tls_cert_expiry_timestamp_seconds")
    except (httpx.HTTPError, ParseError):
        return None
    return max(series.values()) if series else None


def check_tls_cert(inputs: DoctorInputs) -> CheckResult:
    title = "TLS certificate expiry"
    deployment = inputs.deployment
    if deployment is None:
        return _config_refused("tls_cert", title)
    path = deployment.tls_cert
    fix = f"qpq-ops rotate tls --config {inputs.config_path}"
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except OSError as exc:
        return CheckResult("tls_cert", title, CheckState.CRITICAL,
                           f"cannot read {path}: {exc.strerror}", fix)
    except ValueError:
        return CheckResult("tls_cert", title, CheckState.CRITICAL,
                           f"{path} is not a PEM certificate", fix)
    not_after = cert.not_valid_after_utc.timestamp()
    days = (not_after - inputs.now) / DAY
    when = datetime.fromtimestamp(not_after, UTC).strftime("%Y-%m-%d %H:%M UTC")
    if days < 0:
        return CheckResult("tls_cert", title, CheckState.CRITICAL,
                           f"{path} expired {-days:.1f} days ago ({when})", fix, days)
    detail = f"{path} expires in {days:.1f} days ({when})"
    if days < CERT_CRITICAL_DAYS:
        return CheckResult("tls_cert", title, CheckState.CRITICAL, detail, fix, days)
    if days < CERT_WARNING_DAYS:
        return CheckResult("tls_cert", title, CheckState.WARNING, detail, fix, days)
    served = _served_expiry(deployment, inputs.timeout)
    if served is not None and abs(served - not_after) > 1:
        return CheckResult(
            "tls_cert", title, CheckState.WARNING,
            f"{detail}, but the server serves a certificate expiring "
            f"{datetime.fromtimestamp(served, UTC):%Y-%m-%d}",
            f"reload the server: kill -HUP $(cat {deployment.pid_file})", days,
        )
    return CheckResult("tls_cert", title, CheckState.OK, detail, value=days)


def _tree_bytes(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):  # a file removed while walking
                total += (Path(root) / name).lstat().st_size
    return total


def _gb(n: float) -> str:
    return f"{n / 1e9:,.1f} GB"


def check_disk(inputs: DoctorInputs) -> CheckResult:
    title = "Free disk for the data dir"
    if inputs.deployment is None:
        return _config_refused("disk", title)
    data_dir = inputs.deployment.data_dir
    try:
        usage = shutil.disk_usage(data_dir)
    except OSError as exc:
        return CheckResult("disk", title, CheckState.CRITICAL,
                           f"cannot stat {data_dir}: {exc.strerror}",
                           "create the data dir (qpq-server init) or fix [server] data_dir")
    used_pct = 100 * (usage.total - usage.free) / usage.total if usage.total else 100.0
    trigger = get_trigger("disk_usage")
    fix = "expand the volume or shorten retention; prune old backups"
    if trigger.state_for(used_pct).value == "critical":
        return CheckResult("disk", title, CheckState.CRITICAL,
                           f"{used_pct:.1f} % used (> {trigger.critical:g} %)", fix, used_pct)
    if inputs.plan is None:
        state = CheckState(trigger.state_for(used_pct).value)
        return CheckResult(
            "disk", title, state,
            f"{used_pct:.1f} % used, {_gb(usage.free)} free (no --plan: thresholds only)",
            fix if state is not CheckState.OK else "", used_pct,
        )
    plan = inputs.plan
    room = usage.free + _tree_bytes(data_dir)  # what qpq's data can grow into
    days = plan.inputs.retention_days
    detail = (f"{_gb(room)} for qpq data; the plan needs {_gb(plan.retained_bytes)} for "
              f"{days} days, {_gb(plan.retention_storage_bytes)} with headroom")
    if room < plan.retained_bytes:
        return CheckResult("disk", title, CheckState.CRITICAL, detail, fix, float(room))
    if room < plan.retention_storage_bytes:
        return CheckResult("disk", title, CheckState.WARNING, detail, fix, float(room))
    return CheckResult("disk", title, CheckState.OK, detail, value=float(room))


def _backup_timestamp(inputs: DoctorInputs) -> tuple[float | None, str]:
    path = inputs.textfile_dir / BACKUP_FILE
    try:
        series = parse(path.read_text()).series(BACKUP_METRIC)
        if series:
            return max(series.values()), str(path)
    except (OSError, ParseError):
        pass
    if inputs.prometheus_url is not None:
        prom = PrometheusQuerier(inputs.prometheus_url, inputs.timeout)
        try:
            samples = prom.query(f"max({BACKUP_METRIC})")
        except SourceError:
            samples = []
        finally:
            prom.close()
        if samples and math.isfinite(samples[0].value):
            return samples[0].value, "Prometheus"
    return None, str(path)


def check_backup(inputs: DoctorInputs) -> CheckResult:
    title = "Last successful backup"
    config = inputs.config_path
    fix = f"qpq-ops backup create --config {config} --dest BACKUP_DIR (and schedule it)"
    stamp, where = _backup_timestamp(inputs)
    if stamp is None:
        return CheckResult("backup", title, CheckState.WARNING,
                           f"no backup recorded ({where})", fix)
    age = inputs.now - stamp
    hours = age / 3600
    detail = f"{hours:.1f} h ago (from {where})"
    if age > inputs.backup_critical_age_s:
        return CheckResult("backup", title, CheckState.CRITICAL, detail, fix, age)
    if age > inputs.backup_warning_age_s:
        return CheckResult("backup", title, CheckState.WARNING, detail, fix, age)
    return CheckResult("backup", title, CheckState.OK, detail, value=age)


def check_clock(inputs: DoctorInputs) -> CheckResult:
    title = "Clock offset"
    fix = "enable NTP (chrony or systemd-timesyncd)"
    reading = inputs.clock()
    if reading is None:
        return CheckResult("clock", title, CheckState.SKIPPED, "this host cannot tell")
    if not reading.synchronised:
        return CheckResult("clock", title, CheckState.WARNING,
                           f"clock not synchronised to NTP ({reading.source})", fix)
    offset = reading.offset_s or 0.0
    detail = f"{offset * 1000:.1f} ms from NTP ({reading.source})"
    if offset > CLOCK_CRITICAL_S:
        return CheckResult("clock", title, CheckState.CRITICAL, detail, fix, offset)
    if offset > CLOCK_WARNING_S:
        return CheckResult("clock", title, CheckState.WARNING, detail, fix, offset)
    return CheckResult("clock", title, CheckState.OK, detail, value=offset)


def _same_endpoint(scrape_url: str, deployment: Deployment) -> bool:
    parts = urlsplit(scrape_url)
    if parts.port != deployment.metrics_port:
        return False
    listen_host = deployment.metrics_listen.rpartition(":")[0].strip("[]")
    # A wildcard or loopback listener can be scraped under any of this host's names.
    return listen_host in ("", "0.0.0.0", "::", "127.0.0.1", "localhost", "::1") or (
        parts.hostname == listen_host
    )


def check_prometheus_scrape(inputs: DoctorInputs) -> CheckResult:
    title = "Prometheus scrapes this server"
    if inputs.prometheus_url is None:
        return CheckResult("prometheus", title, CheckState.SKIPPED, "no --prometheus-url")
    deployment = inputs.deployment
    if deployment is None:
        return _config_refused("prometheus", title)
    where = deployment.metrics_listen
    fix = f"add {where} to a scrape job in prometheus.yml and reload Prometheus"
    prom = PrometheusQuerier(inputs.prometheus_url, inputs.timeout)
    try:
        targets = prom.targets()
    except SourceError as exc:
        return CheckResult("prometheus", title, CheckState.NO_DATA, str(exc),
                           "check --prometheus-url and that Prometheus runs")
    finally:
        prom.close()
    ours = [t for t in targets if _same_endpoint(t.scrape_url, deployment)]
    if not ours:
        return CheckResult("prometheus", title, CheckState.WARNING,
                           f"no active target scrapes {where}", fix)
    up = [t for t in ours if t.health == "up"]
    if up:
        return CheckResult("prometheus", title, CheckState.OK,
                           f"job {up[0].job!r} scrapes {up[0].scrape_url} (up)")
    target = ours[0]
    return CheckResult("prometheus", title, CheckState.CRITICAL,
                       f"job {target.job!r} scrapes {target.scrape_url}: {target.health} "
                       f"({target.last_error or 'no error given'})",
                       "check the server's [metrics] listen and firewall")


PG_MIN_VERSION = 130000  # PostgreSQL 13 (Debian 11); qpq's SQL needs 11, 13 is supported


def _database_url(deployment: Deployment) -> str:
    return os.environ.get("QPQ_DATABASE_URL") or read_env_file(deployment.env_file).get(
        "QPQ_DATABASE_URL", "")


def check_database(inputs: DoctorInputs) -> CheckResult:
    """postgres backend: the database answers, its version, and its schema vs this qpq."""
    title = "PostgreSQL database"
    deployment = inputs.deployment
    if deployment is None:
        return _config_refused("database", title)
    if deployment.config.storage.backend != "postgres":
        return CheckResult("database", title, CheckState.SKIPPED,
                           f"[storage] backend is {deployment.config.storage.backend!r}")
    dsn = _database_url(deployment)
    if not dsn:
        return CheckResult("database", title, CheckState.CRITICAL, "QPQ_DATABASE_URL is not set",
                           f"set it in {deployment.env_file} (0600)")
    import psycopg  # only postgres deployments load the driver

    from qpq_server.storage.pg_migrations import PG_SCHEMA_VERSION
    from qpq_server.storage.postgres import describe_pg_error

    try:
        with psycopg.connect(dsn, connect_timeout=max(1, int(inputs.timeout))) as conn:
            version = int(conn.info.server_version)
            row = conn.execute("SELECT to_regclass('schema_version') IS NOT NULL").fetchone()
            schema = 0
            if row and row[0]:
                got = conn.execute("SELECT max(version) FROM schema_version").fetchone()
                schema = int(got[0]) if got and got[0] is not None else 0
    except psycopg.Error as exc:
        return CheckResult("database", title, CheckState.CRITICAL,
                           f"cannot connect: {describe_pg_error(exc, dsn)}",
                           "check QPQ_DATABASE_URL, that PostgreSQL runs, and pg_hba.conf")
    shown = f"PostgreSQL {version // 10000}.{version % 10000}, schema {schema}"
    if schema > PG_SCHEMA_VERSION:
        return CheckResult("database", title, CheckState.CRITICAL,
                           f"{shown}: newer than this qpq ({PG_SCHEMA_VERSION})",
                           "upgrade qpq-server on this node to the cluster's version")
    if version < PG_MIN_VERSION:
        return CheckResult("database", title, CheckState.WARNING,
                           f"{shown}: older than PostgreSQL 13", "upgrade PostgreSQL")
    if schema < PG_SCHEMA_VERSION:
        return CheckResult("database", title, CheckState.WARNING,
                           f"{shown}: this qpq migrates it to {PG_SCHEMA_VERSION} at start",
                           "start (or restart) qpq-server to apply the migrations")
    return CheckResult("database", title, CheckState.OK, shown, value=float(schema))


def check_federation(inputs: DoctorInputs) -> list[CheckResult]:
    """Our federation certificate and each peer's reachability (federation enabled)."""
    title = "Federation"
    deployment = inputs.deployment
    if deployment is None:
        return [_config_refused("federation", title)]
    results = federation_results(deployment.config, inputs.config_path, inputs.now,
                                 inputs.timeout)
    return results or [CheckResult("federation", title, CheckState.SKIPPED,
                                   "[federation] enabled = false")]


Check = Callable[[DoctorInputs], CheckResult | list[CheckResult]]

CHECKS: tuple[tuple[str, Check], ...] = (
    ("sysctl", check_sysctl_values),
    ("nofile", check_open_files),
    ("config", check_config),
    ("readyz", check_readyz),
    ("tls_cert", check_tls_cert),
    ("disk", check_disk),
    ("backup", check_backup),
    ("clock", check_clock),
    ("prometheus", check_prometheus_scrape),
    ("database", check_database),
    ("federation", check_federation),
)

CHECK_IDS: tuple[str, ...] = tuple(check_id for check_id, _ in CHECKS)
