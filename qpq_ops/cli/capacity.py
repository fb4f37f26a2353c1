"""`qpq-ops capacity plan`: size a qpq box from the scaling guide's worksheet."""

from __future__ import annotations

import math
import tomllib
from dataclasses import asdict, fields
from pathlib import Path
from typing import Annotated

import typer
import yaml
from rich.table import Table
from rich.text import Text

from qpq_ops._console import fail, out, print_json, styled
from qpq_ops.capacity import (
    BEYOND_ONE_NODE,
    TIERS,
    CapacityInputs,
    CapacityPlan,
    plan,
)
from qpq_ops.errors import CapacityInputError, SourceError
from qpq_ops.evaluate.prometheus_client import PrometheusQuerier
from qpq_ops.exit_codes import ExitCode

__all__ = ["app", "inputs_from_file", "observed_load", "plan_command"]

app = typer.Typer(
    help="Size a qpq deployment: storage, memory, vCPUs, sizing tier and host tuning.",
    no_args_is_help=True,
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


def plan_json(result: CapacityPlan, sources: dict[str, str]) -> dict[str, object]:
    doc = asdict(result)
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
    figures = Table(title="Capacity plan", title_justify="left")
    figures.add_column("figure")
    figures.add_column("value", justify="right")
    figures.add_column("how")
    rows = [
        ("storage per day", _si(result.storage_per_day_bytes),
         f"messages {_si(result.message_bytes_per_day)} + blobs {_si(result.blob_bytes_per_day)}"),
        ("DB growth per month", _si(result.db_growth_per_month_bytes), "storage per day x 30"),
        ("retained data", _si(result.retained_bytes), "storage per day x retention days"),
        ("storage for retention", _si(result.retention_storage_bytes),
         f"retained data / {fill:.2f} (stays under the disk_usage warning)"),
        ("memory (qpq process)", _si(result.memory_bytes),
         f"{result.peak_users:,} peak users x 5 KB + 256 MB base"),
        ("memory model (guide)", _si(result.memory_model.total_bytes),
         "connections, sessions, rate limits, waiters, pool 50 MB, base 30 MB"),
        ("vCPUs", str(result.vcpus),
         f"max(connections / 2,500 -> {result.vcpus_for_connections}, "
         f"{result.peak_messages_per_s:,.1f} msg/s -> {result.vcpus_for_messages})"),
        ("open files (nofile)", f"{result.nofile:,}", "ulimit -n / systemd LimitNOFILE"),
    ]
    for row in rows:
        figures.add_row(*row)
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
    console.print(styled("Note: the guide's 5 KB per connection is the Rust figure; aioquic "
                         "measured ~70 KB per idle connection (aioquic-notes.md).", "dim"))


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
    json_out: Annotated[bool, typer.Option(
        "--json", help="Print the plan as JSON (bytes, vCPUs, counts) on stdout.")] = False,
) -> None:
    """Apply the scaling guide's capacity worksheet (SI units: 1 KB = 10^3 B).

    Prints storage per day, DB growth per month, storage for the retention period,
    memory and vCPU estimates, the sizing tier that fits, and the file descriptor and
    UDP buffer settings to apply. Invalid inputs exit 64.
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
    result = plan(inputs)
    if json_out:
        print_json(plan_json(result, sources))
    else:
        _print_plan(result, sources)
