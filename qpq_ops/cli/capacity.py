"""`qpq-ops capacity plan`: size a qpq box from the scaling guide's worksheet."""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import asdict, fields
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
import yaml
from rich.table import Table
from rich.text import Text

from qpq_ops._console import err, fail, out, print_json, styled
from qpq_ops.calibration import dump
from qpq_ops.capacity import (
    BEYOND_ONE_NODE,
    NR_OPEN_DEFAULT,
    PG_EXTRA_CONNECTIONS,
    PG_MIN_VCPUS,
    PG_POOL_SIZE,
    TIERS,
    CapacityInputs,
    CapacityPlan,
    plan,
)
from qpq_ops.cli._calibration import CalibrationOpt, calibration_or_fail
from qpq_ops.cli._lazy import LazyEntry, lazy_group
from qpq_ops.errors import (
    CalibrationRunError,
    CapacityInputError,
    SourceError,
)
from qpq_ops.exit_codes import ExitCode
from qpq_ops.tuning import write_atomic

__all__ = ["app", "calibrate_command", "inputs_from_file", "observed_load", "plan_command"]

# `capacity forecast` lives in its own module (numpy, Prometheus history), imported only
# when it runs: `capacity plan` pays for neither (issue 17).
FORECAST = LazyEntry(
    "qpq_ops.cli.forecast:forecast",
    "Forecast when disk, memory, connections vs cap and the delivery queue will cross\n"
    "their scaling-trigger lines, and how many workers and hosts the load will need.")

app = typer.Typer(
    help="Size a qpq deployment: storage, memory, vCPUs, sizing tier and host tuning.",
    no_args_is_help=True,
    cls=lazy_group({"forecast": FORECAST}),
)

_INPUT_NAMES = tuple(f.name for f in fields(CapacityInputs))
_INT_INPUTS = ("users", "retention_days")


def _number(name: str, raw: object) -> float | int:
    """Parse one input; refuse non-numbers with a message naming the option."""
    option = "--" + name.replace("_", "-")
    if isinstance(raw, bool):
        fail(f"{option}: expected a number, got {raw!r}", ExitCode.USAGE)
    if isinstance(raw, int | float):
        value = float(raw)
    else:
        try:
            value = float(str(raw).strip().replace("_", ""))
        except ValueError:
            fail(f"{option}: expected a number, got {raw!r}", ExitCode.USAGE)
    if not math.isfinite(value):
        fail(f"{option}: expected a finite number, got {raw!r}", ExitCode.USAGE)
    if name in _INT_INPUTS:
        if not value.is_integer():
            fail(f"{option}: expected a whole number, got {raw!r}", ExitCode.USAGE)
        return int(value)
    return value


def _read_file(path: Path) -> dict[str, object]:
    """Inputs from YAML or TOML; keys are the option names (dashes or underscores),
    at the top level or under a `capacity` table."""
    try:
        text = path.read_text()
    except OSError as exc:
        fail(f"--from-file: cannot read {path}: {exc.strerror}", ExitCode.USAGE)
    try:
        data: object = (
            tomllib.loads(text) if path.suffix.lower() == ".toml" else yaml.safe_load(text)
        )
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        fail(f"--from-file: {path} is not valid {path.suffix or 'YAML'}: {first}")
    if isinstance(data, dict) and isinstance(data.get("capacity"), dict):
        data = data["capacity"]
    if not isinstance(data, dict):
        fail(f"--from-file: {path} must hold a mapping of input names to numbers")
    values: dict[str, object] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in _INPUT_NAMES:
            fail(f"--from-file: unknown input {key!r} in {path}; "
                 f"known: {', '.join(n.replace('_', '-') for n in _INPUT_NAMES)}")
        values[name] = value
    return values


def inputs_from_file(path: Path) -> CapacityInputs:
    """Every input from a YAML/TOML file (as `--from-file`); exits 64 when unusable."""
    raw = _read_file(path)
    missing = [n for n in _INPUT_NAMES if n not in raw and n != "peak_factor"]
    if missing:
        fail(f"{path}: missing input(s): " + ", ".join(n.replace("_", "-") for n in missing))
    numbers = {name: _number(name, value) for name, value in raw.items()}
    try:
        return CapacityInputs(**numbers)  # type: ignore[arg-type]
    except CapacityInputError as exc:
        fail(f"{path}: {exc}")


def observed_load(url: str, lookback: str, timeout: float) -> dict[str, float | int]:
    """Peak concurrent connections and messages per user per hour over `lookback`.

    Messages per user-hour is the observed enqueue rate divided by the peak, so that
    users x msgs/hr reproduces the observed total message rate.
    """
    # Only `--from-prometheus` needs the HTTP client stack (issue 17: lazy imports).
    from qpq_ops.evaluate.prometheus_client import PrometheusQuerier

    prom = PrometheusQuerier(url, timeout)
    try:
        peak = prom.query(f"max_over_time(sum(qpq_connections_active)[{lookback}:1m])")
        rate = prom.query(f"sum(rate(qpq_enqueue_total[{lookback}])) * 3600")
    finally:
        prom.close()
    if not peak or not math.isfinite(peak[0].value) or peak[0].value < 1:
        raise SourceError(
            f"Prometheus at {url} has no qpq_connections_active above 0 in the last {lookback}"
        )
    if not rate or not math.isfinite(rate[0].value):
        raise SourceError(f"Prometheus at {url} has no qpq_enqueue_total in the last {lookback}")
    users = math.ceil(peak[0].value)
    return {"users": users, "msgs_per_user_hour": rate[0].value / users}


def _si(n: float, unit: str = "B") -> str:
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= factor:
            return f"{n / factor:,.2f} {prefix}{unit}"
    return f"{n:,.0f} {unit}"


class Model(StrEnum):
    MEASURED = "measured"
    GUIDE = "guide"


def plan_json(result: CapacityPlan, sources: dict[str, str]) -> dict[str, object]:
    """The plan as JSON; the guide model's keys are exactly those of the worksheet."""
    doc = asdict(result)
    measured = doc.pop("measured")
    if measured is not None:
        guide = plan(result.inputs)
        doc["model"] = "measured"
        doc["measured"] = measured
        doc["guide"] = {"memory_bytes": guide.memory_bytes, "vcpus": guide.vcpus,
                        "tier": guide.tier}
    model = doc.pop("memory_model")
    doc["memory_model"] = {**model, "total_bytes": result.memory_model.total_bytes}
    doc["host"] = {
        "vcpus": doc.pop("host_vcpus"),
        "memory_bytes": doc.pop("host_memory_bytes"),
        "disk_bytes": doc.pop("host_disk_bytes"),
    }
    doc["input_sources"] = sources
    return doc


def _print_plan(result: CapacityPlan, sources: dict[str, str]) -> None:
    console = out()
    inputs = Table(title="Inputs", title_justify="left")
    inputs.add_column("input")
    inputs.add_column("value", justify="right")
    inputs.add_column("from")
    for name in _INPUT_NAMES:
        inputs.add_row(name.replace("_", "-"), f"{getattr(result.inputs, name):,}",
                       sources.get(name, "default"))
    console.print(inputs)

    fill = result.disk_headroom_fill_ratio
    measured = result.measured
    figures = Table(title="Capacity plan", title_justify="left")
    figures.add_column("figure")
    if measured is not None:
        figures.add_column("qpq measured", justify="right")
    figures.add_column("guide", justify="right")
    figures.add_column("how", overflow="fold")
    guide = plan(result.inputs)  # the worksheet, for the comparison column

    def row(name: str, mine: str | None, theirs: str, how: str) -> None:
        cells = [name, *([mine or "-"] if measured is not None else []), theirs, how]
        figures.add_row(*cells)

    row("storage per day", _si(result.storage_per_day_bytes),
        _si(guide.storage_per_day_bytes),
        f"messages {_si(result.message_bytes_per_day)} + blobs {_si(result.blob_bytes_per_day)}")
    row("DB growth per month", _si(result.db_growth_per_month_bytes),
        _si(guide.db_growth_per_month_bytes), "storage per day x 30")
    row("storage for retention", _si(result.retention_storage_bytes),
        _si(guide.retention_storage_bytes),
        f"retained {_si(result.retained_bytes)} / {fill:.2f} (under the disk_usage warning)")
    if measured is not None:
        calib = result.measured
        assert calib is not None
        row("memory (qpq)", _si(measured.memory_bytes), _si(guide.memory_bytes),
            f"measured: {measured.workers} worker(s) x base RSS + {result.peak_users:,} "
            "connections x RSS per idle connection; guide: users x 5 KB + 256 MB")
        row("vCPUs / workers", f"{measured.workers} ({measured.cpu_cores:,.2f} cores busy)",
            str(guide.vcpus),
            f"measured: {result.peak_messages_per_s:,.1f} msg/s x CPU per enqueue+fetch+ack, "
            "each worker under the process_cpu warning; guide: connections / 2,500")
        row("hosts", f"{measured.hosts}", "1",
            f"workers / {measured.cores_per_host} cores per host (--cores-per-host)")
        row("workers per host", f"{measured.workers_per_host}", "-",
            "[server] workers on each host: workers / hosts")
        row("storage backend", measured.storage_backend, "-",
            "sqlcipher while one host and its measured commits/s suffice, else one "
            "PostgreSQL the hosts share")
        row("reconnect storm", f"{measured.reconnect_storm_s:,.1f} s", "-",
            "every peak user handshakes and logs in again after a restart")
        row("durable commits/s", f"{measured.commits_needed_per_s:,.1f} needed",
            "-", f"{measured.commits_measured_per_s:,.0f}/s measured on the calibration host")
        if measured.postgres is not None:
            pg = measured.postgres
            row("PostgreSQL vCPUs", f"{pg.vcpus} ({pg.cpu_cores:,.2f} cores busy)", "-",
                f"{result.peak_messages_per_s:,.1f} msg/s x {pg.cpu_s_per_message * 1000:.2f} "
                f"ms PostgreSQL CPU per message (measured: {pg.measured_by}), under the cpu "
                f"warning; at least {PG_MIN_VCPUS}")
            row("PostgreSQL memory", _si(pg.memory_bytes), "-",
                "4 x (2 x 15 min of peak message bytes) so shared_buffers holds them; "
                "at least 4 GB")
            row("PostgreSQL disk", _si(pg.disk_bytes), "-",
                "storage for retention + 2 GB WAL")
            row("PostgreSQL max_connections", str(pg.max_connections), "-",
                f"hosts x workers per host x (pool_size {PG_POOL_SIZE} + 1 LISTEN) + "
                f"{PG_EXTRA_CONNECTIONS}, +25 %")
    else:
        row("memory (qpq process)", None, _si(result.memory_bytes),
            f"{result.peak_users:,} peak users x 5 KB + 256 MB base")
        row("memory model (guide)", None, _si(result.memory_model.total_bytes),
            "connections, sessions, rate limits, waiters, pool 50 MB, base 30 MB")
        row("vCPUs", None, str(result.vcpus),
            f"max(connections / 2,500 -> {result.vcpus_for_connections}, "
            f"{result.peak_messages_per_s:,.1f} msg/s -> {result.vcpus_for_messages})")
    row("open files (nofile)", f"{result.nofile:,}", f"{guide.nofile:,}",
        "ulimit -n / systemd LimitNOFILE")
    console.print(figures)

    if result.tier == BEYOND_ONE_NODE:
        console.print(styled(f"Tier: {BEYOND_ONE_NODE}", "bold red")
                      + Text(" (needs exceed the Large tier)"))
    else:
        tier = next(t for t in TIERS if t.name == result.tier)
        console.print(
            styled(f"Tier: {tier.name}", "bold") + Text(
                f" ({tier.purpose}): {tier.cpu}, {tier.memory}, "
                f"{tier.disk}, {tier.network}; supports {tier.supports}")
        )
    console.print(
        f"Provision at least: {result.host_vcpus} vCPU, {_si(result.host_memory_bytes)} "
        f"memory, {_si(result.host_disk_bytes)} disk for data"
    )
    console.print("Apply: `qpq-ops tune sysctl --write /etc/sysctl.d/99-qpq.conf` "
                  "and `qpq-ops tune ulimits`:")
    for key, value in result.sysctl.items():
        console.print(f"  {key} = {value}", highlight=False)
    console.print(f"  LimitNOFILE={result.nofile}", highlight=False)
    if "fs.nr_open" in result.sysctl:
        console.print(styled(f"nofile {result.nofile:,} is above Linux's default fs.nr_open "
                             f"({NR_OPEN_DEFAULT:,}): apply fs.nr_open first, or no process "
                             "can get that limit.", "yellow"))
    if measured is not None and measured.postgres is not None:
        pg = measured.postgres
        console.print(
            f"Beyond one host: {measured.hosts} hosts x [server] workers = "
            f"{measured.workers_per_host}, [storage] backend = \"postgres\" on one "
            f"PostgreSQL of {pg.vcpus} vCPU, {_si(pg.memory_bytes)} memory, "
            f"{_si(pg.disk_bytes)} disk, max_connections = {pg.max_connections} "
            "(docs/operations/multi-node.md)")
    if measured is not None:
        machine = ", ".join(f"{k} {v}" for k, v in measured.calibration_machine.items())
        console.print(styled(f"Measured model from a calibration on: {machine}. Calibrate "
                             "this hardware with `qpq-ops capacity calibrate --out FILE`.",
                             "dim"))
    else:
        console.print(styled("Guide model: 5 KB per connection and 2,500 connections per "
                             "vCPU are the Rust original's figures; qpq measures ~70 KB per "
                             "idle connection (use --model measured).", "dim"))


@app.command("plan")
def plan_command(
    users: Annotated[str | None, typer.Option(
        "--users", metavar="N", help="Expected concurrent users (connections).")] = None,
    msgs_per_user_hour: Annotated[str | None, typer.Option(
        "--msgs-per-user-hour", metavar="N", help="Messages each user sends per hour.")] = None,
    avg_msg_bytes: Annotated[str | None, typer.Option(
        "--avg-msg-bytes", metavar="N", help="Average message size in bytes.")] = None,
    blob_uploads_per_day: Annotated[str | None, typer.Option(
        "--blob-uploads-per-day", metavar="N", help="File uploads per day, all users.")] = None,
    avg_blob_mb: Annotated[str | None, typer.Option(
        "--avg-blob-mb", metavar="X", help="Average file size in MB (1 MB = 10^6 bytes).")] = None,
    retention_days: Annotated[str | None, typer.Option(
        "--retention-days", metavar="N", help="Days messages and files are kept.")] = None,
    peak_factor: Annotated[str | None, typer.Option(
        "--peak-factor", metavar="X",
        help="Peak / average concurrent load (default 1); scales memory, CPU, nofile.")] = None,
    from_file: Annotated[Path | None, typer.Option(
        "--from-file", metavar="FILE",
        help="Read inputs from YAML or TOML (keys = option names); options override it.")] = None,
    from_prometheus: Annotated[str | None, typer.Option(
        "--from-prometheus", metavar="URL",
        help="Fill --users (peak connections) and --msgs-per-user-hour (enqueue rate) "
        "from what Prometheus observed.")] = None,
    lookback: Annotated[str, typer.Option(
        help="Window for --from-prometheus, a PromQL duration.")] = "7d",
    timeout: Annotated[float, typer.Option(help="Seconds allowed for Prometheus.")] = 10.0,
    calibration: CalibrationOpt = None,
    model: Annotated[Model, typer.Option(
        "--model", help="measured: size from qpq's own costs; guide: the scaling guide's "
        "worksheet as written (same JSON keys as before, for comparison).",
    )] = Model.MEASURED,
    cores_per_host: Annotated[int, typer.Option(
        "--cores-per-host", metavar="N", help="Cores of one host, for the hosts figure "
        "(measured model).")] = 8,
    json_out: Annotated[bool, typer.Option(
        "--json", help="Print the plan as JSON (bytes, vCPUs, counts) on stdout.")] = False,
) -> None:
    """Size a deployment from qpq's measured costs (SI units: 1 KB = 10^3 B).

    Prints storage per day, DB growth per month, storage for the retention period,
    memory, worker processes, hosts, the reconnect storm after a restart and the
    durable commits needed (qpq's measured model, `--calibration FILE` or the shipped
    reference), beside the scaling guide's worksheet figures (`--model guide` for the
    worksheet alone); then the sizing tier and the file descriptor and UDP buffer
    settings. Invalid or implausible inputs (e.g. 10^23 users) exit 64.
    """
    raw: dict[str, object] = {}
    sources: dict[str, str] = {}
    if from_file is not None:
        for name, value in _read_file(from_file).items():
            raw[name], sources[name] = value, "file"
    if from_prometheus is not None:
        try:
            observed = observed_load(from_prometheus, lookback, timeout)
        except SourceError as exc:
            fail(str(exc), ExitCode.CANNOT_EVALUATE)
        for name, value in observed.items():
            raw[name], sources[name] = value, "prometheus"
    given = {
        "users": users, "msgs_per_user_hour": msgs_per_user_hour,
        "avg_msg_bytes": avg_msg_bytes, "blob_uploads_per_day": blob_uploads_per_day,
        "avg_blob_mb": avg_blob_mb, "retention_days": retention_days,
        "peak_factor": peak_factor,
    }
    for name, value in given.items():
        if value is not None:
            raw[name], sources[name] = value, "option"
    missing = [n for n in _INPUT_NAMES if n not in raw and n != "peak_factor"]
    if missing:
        fail("missing input(s): " + ", ".join("--" + n.replace("_", "-") for n in missing))
    numbers = {name: _number(name, value) for name, value in raw.items()}
    try:
        inputs = CapacityInputs(**numbers)  # type: ignore[arg-type]
    except CapacityInputError as exc:
        fail(f"--{exc.field.replace('_', '-')}: {str(exc).split(': ', 1)[1]}", ExitCode.USAGE)
    if not 1 <= cores_per_host <= 1024:
        fail(f"--cores-per-host: must be 1 to 1024, got {cores_per_host}")
    if model is Model.GUIDE and calibration is not None:
        fail("--calibration is for --model measured; the guide model has no calibration")
    costs = calibration_or_fail(calibration) if model is Model.MEASURED else None
    result = plan(inputs, costs, cores_per_host)
    if json_out:
        print_json(plan_json(result, sources))
    else:
        _print_plan(result, sources)


@app.command("calibrate")
def calibrate_command(
    seconds: Annotated[float, typer.Option(
        "--seconds", metavar="N", help="Load time, shared by the six phases (2 to 600).",
    )] = 20.0,
    idle_connections: Annotated[int, typer.Option(
        "--idle-connections", metavar="N",
        help="Idle connections held open to measure RSS per connection (10 to 5,000).",
    )] = 200,
    out_file: Annotated[Path | None, typer.Option(
        "--out", metavar="FILE", help="Write the calibration JSON to FILE, for "
        "`capacity plan --calibration FILE`.")] = None,
    json_out: Annotated[bool, typer.Option(
        "--json", help="Print the calibration as JSON on stdout.")] = False,
) -> None:
    """Measure qpq's own costs on this host against a throwaway server on loopback.

    Starts `qpq-server` with a temporary data dir on free 127.0.0.1 ports, then records
    resident memory per idle connection, server CPU per enqueue, fetch and ack, per
    QUIC/TLS handshake and per OPAQUE login, and the durable commits per second, with
    the machine described. Client and server share this host, so CPU figures are upper
    bounds. Run it on the hardware you size for; exit 3 when the server cannot run.
    """
    if not 2 <= seconds <= 600:
        fail(f"--seconds: must be 2 to 600, got {seconds:g}")
    if not 10 <= idle_connections <= 5000:
        fail(f"--idle-connections: must be 10 to 5,000, got {idle_connections}")
    if out_file is not None and not out_file.parent.is_dir():
        fail(f"--out: directory {out_file.parent} does not exist")
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from qpq_ops.calibrate import calibrate

    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=err(), transient=True) as progress:
        task = progress.add_task("starting a throwaway qpq-server", total=None)
        try:
            result = calibrate(seconds, idle_connections,
                               progress=lambda phase: progress.update(task, description=phase))
        except CalibrationRunError as exc:
            fail(str(exc), ExitCode.CANNOT_EVALUATE)
    text = dump(result)
    if out_file is not None:
        try:
            write_atomic(out_file, text)
        except OSError as exc:
            fail(f"cannot write {out_file}: {exc.strerror or exc}", ExitCode.CANNOT_EVALUATE)
        err().print(f"wrote {out_file}", highlight=False)
    if json_out:
        print_json(json.loads(text))
        return
    table = Table(title="qpq's costs on this host", title_justify="left")
    table.add_column("cost")
    table.add_column("measured", justify="right")
    for name, value in (
        ("base RSS (one process)", _si(result.rss_base_bytes)),
        ("RSS per idle connection", _si(result.rss_per_connection_bytes)),
        ("CPU per enqueue", f"{result.cpu_s_per_enqueue * 1e3:.3f} ms"),
        ("CPU per fetch", f"{result.cpu_s_per_fetch * 1e3:.3f} ms"),
        ("CPU per ack", f"{result.cpu_s_per_ack * 1e3:.3f} ms"),
        ("CPU per handshake", f"{result.cpu_s_per_handshake * 1e3:.3f} ms"),
        ("CPU per OPAQUE login", f"{result.cpu_s_per_login * 1e3:.3f} ms"),
        ("durable commits", f"{result.durable_commits_per_s:,.0f}/s"),
    ):
        table.add_row(name, value)
    out().print(table)
    out().print(styled("machine: " + ", ".join(f"{k} {v}" for k, v in result.machine.items()),
                       "dim"))
