"""`qpq-ops doctor`: one self-check of host and deployment, with the fix for each finding."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from qpq_ops._console import fail, out, print_json, styled_state
from qpq_ops.capacity import plan
from qpq_ops.cli.capacity import inputs_from_file
from qpq_ops.deployment import Deployment, load_deployment
from qpq_ops.doctor import (
    CHECK_IDS,
    CheckResult,
    DoctorInputs,
    exit_code_for,
    run_doctor,
    worst,
)
from qpq_ops.errors import ConfigInvalid, ConfigUnreadable, SourceError
from qpq_ops.evaluate.direct import http_url

__all__ = ["doctor", "doctor_table"]

DEFAULT_TEXTFILE_DIR = Path("/var/lib/prometheus/node-exporter")


def doctor_table(results: list[CheckResult], config: Path) -> Table:
    table = Table(title=f"qpq doctor ({config}) status: {worst(results)}", title_justify="left")
    table.add_column("check")
    table.add_column("state")
    table.add_column("found", overflow="fold")
    table.add_column("fix", overflow="fold")  # wrapped, never cut: it is copied
    for r in results:
        table.add_row(r.title, styled_state(r.state), r.detail, r.fix)
    return table


def doctor(
    config: Annotated[Path | None, typer.Option(
        "--config", metavar="PATH", help="The server's qpq-server.toml (default: $QPQ_CONFIG).",
    )] = None,
    prometheus_url: Annotated[str | None, typer.Option(
        "--prometheus-url", metavar="URL",
        help="Also check that this Prometheus scrapes the server (default: "
        "$QPQ_PROMETHEUS_URL).")] = None,
    plan_file: Annotated[Path | None, typer.Option(
        "--plan", metavar="FILE",
        help="Capacity inputs (YAML/TOML, as `capacity plan --from-file`): compare free disk "
        "with the plan's retention storage.")] = None,
    textfile_dir: Annotated[Path, typer.Option(
        "--textfile-dir", metavar="DIR",
        help="node_exporter textfile dir where `backup create` records the last backup.",
    )] = DEFAULT_TEXTFILE_DIR,
    timeout: Annotated[float, typer.Option(
        "--timeout", metavar="SECONDS", help="Per network check.")] = 5.0,
    skip: Annotated[list[str] | None, typer.Option(
        "--skip", metavar="ID",
        help=f"Do not run this check (repeatable): {', '.join(CHECK_IDS)}.")] = None,
    json_out: Annotated[bool, typer.Option(
        "--json", help="Print {status, checks: [...]} as JSON on stdout.")] = False,
    proc_sys: Annotated[Path, typer.Option("--proc-sys", hidden=True)] = Path("/proc/sys"),
    proc: Annotated[Path, typer.Option("--proc", hidden=True)] = Path("/proc"),
) -> None:
    """Check a qpq box before and after go-live: sysctl, open files, config, /readyz,
    TLS expiry (warning < 30 days, critical < 7), free disk vs the capacity plan, last
    backup age, clock offset, whether Prometheus scrapes the server, (backend
    postgres) that the database answers, its version and schema, and (federation
    enabled) our federation certificate (CA, expiry, domain, key) and each peer's
    reachability by one QUIC handshake attempt.

    One line per check with the fix to apply. Exit 2 if any check is critical, else 1 if
    any is warning, else 3 if any has no data, else 0 (skipped checks never fail).
    """
    config = config or (Path(os.environ["QPQ_CONFIG"]) if os.environ.get("QPQ_CONFIG") else None)
    if config is None:
        fail("--config PATH is required (or set QPQ_CONFIG)")
    prometheus_url = prometheus_url or os.environ.get("QPQ_PROMETHEUS_URL") or None
    if not timeout > 0:
        fail(f"--timeout: must be greater than 0, got {timeout:g}")
    deployment: Deployment | None = None
    try:
        deployment = load_deployment(config)
    except ConfigUnreadable as exc:
        fail(str(exc))
    except ConfigInvalid:
        pass  # a finding, not a usage error: the config check reports it
    try:
        prometheus_url = None if prometheus_url is None else http_url(prometheus_url)
    except SourceError as exc:
        fail(str(exc))
    unknown = sorted(set(skip or ()) - set(CHECK_IDS))
    if unknown:
        fail(f"--skip: unknown check {unknown[0]!r}; known: {', '.join(CHECK_IDS)}")
    capacity = None if plan_file is None else plan(inputs_from_file(plan_file))
    inputs = DoctorInputs(
        config_path=config, deployment=deployment, prometheus_url=prometheus_url, plan=capacity,
        textfile_dir=textfile_dir, proc_sys=proc_sys, proc=proc, timeout=timeout,
        now=time.time(), skip=frozenset(skip or ()),
    )
    results = run_doctor(inputs)
    status = worst(results)
    if json_out:
        print_json({"status": str(status), "config": str(config),
                    "checks": [r.to_json() for r in results]})
    else:
        out().print(doctor_table(results, config))
    raise typer.Exit(int(exit_code_for(status)))


