"""`qpq-ops report`: write one self-contained HTML page about the deployment's capacity."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Annotated

import typer

from qpq_ops._console import err, fail, print_json
from qpq_ops.cli._calibration import CalibrationOpt, calibration_or_fail
from qpq_ops.cli.doctor import DEFAULT_TEXTFILE_DIR
from qpq_ops.cli.forecast import parse_window, prometheus_url_or_fail
from qpq_ops.deployment import Deployment, load_deployment
from qpq_ops.doctor import DoctorInputs
from qpq_ops.errors import ConfigInvalid, ConfigUnreadable, SourceError
from qpq_ops.exit_codes import ExitCode
from qpq_ops.report import ReportInputs, build_report

__all__ = ["report"]


def _write_atomically(path: Path, text: str) -> None:
    """Readers never see half a report: write beside it, then rename over it."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def report(
    prometheus_url: Annotated[str | None, typer.Option(
        "--prometheus-url", metavar="URL",
        help="Prometheus holding the deployment's history (default: $QPQ_PROMETHEUS_URL).",
    )] = None,
    out_path: Annotated[Path | None, typer.Option(
        "--out", metavar="FILE", help="Where to write the HTML page (e.g. report.html).",
    )] = None,
    lookback: Annotated[str, typer.Option(
        "--lookback", metavar="DURATION", help="History shown and fitted, e.g. 14d.")] = "14d",
    horizon: Annotated[str, typer.Option(
        "--horizon", metavar="DURATION", help="How far the forecast extends, e.g. 30d.")] = "30d",
    instance: Annotated[list[str] | None, typer.Option(
        "--instance", metavar="INSTANCE",
        help="Only this `instance` label (repeatable); default every instance seen.")] = None,
    config: Annotated[Path | None, typer.Option(
        "--config", metavar="PATH",
        help="On the server's host: include `qpq-ops doctor --config PATH`'s findings.")] = None,
    calibration: CalibrationOpt = None,
    timeout: Annotated[float, typer.Option(
        "--timeout", metavar="SECONDS", help="Deadline for each round of queries.")] = 30.0,
    json_out: Annotated[bool, typer.Option(
        "--json", help="Print {out, status, instances, charts} as JSON on stdout.")] = False,
) -> None:
    """Write an HTML report an operator can open anywhere (no network needed).

    Per instance: disk, memory, connections vs cap and delivery queue over --lookback
    with their warning and critical lines and the trend extended to --horizon, and the
    message rate; then the capacity plan on the observed peaks (workers, hosts, when),
    the alerts that fired in the window (ALERTS), and with --config the doctor's findings.
    Light and dark colour schemes follow the browser.

    Exit 0 once the report is written (whatever it shows; `capacity forecast` gives the
    verdict as an exit code), 3 if Prometheus cannot be read, 64 on bad options.

    Example: `qpq-ops report --prometheus-url http://127.0.0.1:9091 --out report.html`
    """
    if out_path is None:
        fail("--out FILE is required (where to write the HTML report)")
    lookback_s = parse_window("--lookback", lookback)
    horizon_s = parse_window("--horizon", horizon)
    if not timeout > 0:
        fail(f"--timeout: must be greater than 0, got {timeout:g}")
    if out_path.is_dir():
        fail(f"--out: {out_path} is a directory; give a file name such as report.html")
    if not out_path.parent.is_dir():
        fail(f"--out: directory {out_path.parent} does not exist")
    url = prometheus_url_or_fail(prometheus_url)
    doctor_inputs = None
    if config is not None:
        deployment: Deployment | None = None
        try:
            deployment = load_deployment(config)
        except ConfigUnreadable as exc:
            fail(str(exc))
        except ConfigInvalid:
            pass  # a finding the doctor section of the report shows, not a usage error
        doctor_inputs = DoctorInputs(config_path=config, deployment=deployment,
                                     prometheus_url=url, plan=None,
                                     textfile_dir=DEFAULT_TEXTFILE_DIR, now=time.time())
    costs = calibration_or_fail(calibration)
    with err().status("starting", spinner="dots") as status:
        inputs = ReportInputs(url, lookback_s, horizon_s, instance or (), doctor_inputs,
                              timeout, progress=status.update, calibration=costs)
        try:
            page = build_report(inputs)
        except SourceError as exc:
            status.stop()
            fail(str(exc), ExitCode.CANNOT_EVALUATE)
    try:
        _write_atomically(out_path, page.html)
    except OSError as exc:
        fail(f"--out: cannot write {out_path}: {exc.strerror}", ExitCode.CANNOT_EVALUATE)
    if json_out:
        print_json({"out": str(out_path), "status": page.status, "instances": page.instances,
                    "charts": page.charts, "threshold_lines": page.threshold_lines})
    else:
        err().print(f"wrote {out_path}: {len(page.instances)} instance(s), {page.charts} "
                    f"chart(s), forecast status {page.status}", highlight=False)
