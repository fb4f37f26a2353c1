"""`qpq-ops render alerts|rules-tests|dashboard|docs|all`: regenerate the bundle's files.

Every generated file (alert and recording rules, promtool tests, the Grafana dashboard,
the operations docs) comes from `qpq_ops.triggers` and the other definitions in code.
`--check` writes nothing and exits 1 when a file under the root differs from what
would be rendered, so CI catches a hand edit or a forgotten regeneration.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from qpq_ops._console import err, fail, out, print_json, styled
from qpq_ops.exit_codes import ExitCode
from qpq_ops.mounts import mountpoint_of
from qpq_ops.render import Artefact, FileStatus, RenderedFile, check_files, render, write_files
from qpq_ops.render.settings import DEFAULT_RUNBOOK_BASE_URL, RenderSettings, configured
from qpq_ops.triggers import DEFAULT_SCOPE, Scope
from qpq_server.config import load_config
from qpq_server.errors import ConfigError

__all__ = ["app", "default_root"]

app = typer.Typer(
    help="Regenerate the monitoring bundle from the trigger definition: Prometheus alert "
    "and recording rules, promtool tests, the Grafana dashboard and the operations docs. "
    "Paths are relative to --root (default: the qpq checkout around the current "
    "directory). With --check nothing is written and the exit code is 1 when a file "
    "differs.",
    no_args_is_help=True,
)

RootOpt = Annotated[
    Path | None,
    typer.Option("--root", help="Output root: the checkout to write into or check. Default: "
                 "the qpq repository containing the current directory, else the current "
                 "directory.", file_okay=False, show_default=False),
]
CheckOpt = Annotated[
    bool,
    typer.Option("--check", help="Write nothing; exit 1 if any file differs or is missing."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON alone on stdout.")]
QpqJobOpt = Annotated[str, typer.Option(
    "--qpq-job", metavar="JOB", help="Scrape job of the qpq servers every rule selects.")]
NodeJobOpt = Annotated[str, typer.Option(
    "--node-job", metavar="JOB", help="Scrape job of the nodes' node_exporter.")]
MountOpt = Annotated[str | None, typer.Option(
    "--data-mountpoint", metavar="PATH",
    help="Mountpoint of the filesystem holding the data dir (disk_usage watches only it; "
    "`df --output=target DATA_DIR` prints it). Default: that of --config's data dir "
    f"when given, else {DEFAULT_SCOPE.mountpoint}.", show_default=False)]
ConfigOpt = Annotated[Path | None, typer.Option(
    "--config", metavar="PATH", help="The deployment's qpq-server.toml, run on its node: "
    "the data dir's filesystem becomes --data-mountpoint.")]
RunbookOpt = Annotated[str, typer.Option(
    "--runbook-base-url", metavar="URL",
    help="Absolute URL under which docs/ is served; alert runbook_url links point there "
    "(e.g. https://git.example.org/ops/qpq/-/blob/main/docs).")]


def default_root(start: Path) -> Path:
    """The nearest directory from `start` up whose pyproject.toml is qpq's, else `start`."""
    for candidate in (start, *start.parents):
        pyproject = candidate / "pyproject.toml"
        if pyproject.is_file() and 'name = "qpq"' in pyproject.read_text(errors="replace"):
            return candidate
    return start


def _settings(qpq_job: str, node_job: str, mountpoint: str | None, runbook: str,
              config: Path | None) -> RenderSettings:
    if mountpoint is None and config is not None:
        try:
            mountpoint = str(mountpoint_of(load_config(config).data_dir))
        except (OSError, ConfigError) as exc:
            fail(f"--config {config}: {exc}")
    mountpoint = DEFAULT_SCOPE.mountpoint if mountpoint is None else mountpoint
    try:
        return RenderSettings(Scope(qpq_job, node_job, mountpoint), runbook)
    except ValueError as exc:
        fail(str(exc))


def _run(artefact: Artefact, root: Path | None, check: bool, as_json: bool,
         settings: RenderSettings) -> None:
    root = default_root(Path.cwd()) if root is None else root
    if not root.is_dir():
        fail(f"output root {root} is not a directory")
    with configured(settings):
        files: tuple[RenderedFile, ...] = render(artefact)
    try:
        results = check_files(files, root) if check else write_files(files, root)
    except OSError as exc:
        fail(f"cannot write under {root}: {exc.strerror or exc}", ExitCode.CANNOT_EVALUATE)
    stale = [f for f, status in results if status in (FileStatus.DIFFERS, FileStatus.MISSING)]
    if as_json:
        print_json({
            "root": str(root.resolve()),
            "check": check,
            "files": [{"path": str(f.path), "status": str(status)} for f, status in results],
        })
    else:
        table = Table(title=f"qpq-ops render {artefact}", title_justify="left")
        table.add_column("file")
        table.add_column("status")
        style = {FileStatus.WRITTEN: "cyan", FileStatus.UNCHANGED: "green",
                 FileStatus.DIFFERS: "bold red", FileStatus.MISSING: "bold red"}
        for f, status in results:
            table.add_row(str(f.path), styled(str(status), style[status]))
        out().print(table)
    if check and stale:
        err().print(
            f"qpq-ops: {len(stale)} generated file(s) differ from the code: "
            + ", ".join(str(f.path) for f in stale)
            + "; run `qpq-ops render all` and commit the result.",
            highlight=False, soft_wrap=True,
        )
        raise typer.Exit(int(ExitCode.WARNING))


@app.command("alerts")
def alerts(root: RootOpt = None, check: CheckOpt = False, as_json: JsonOpt = False,
        qpq_job: QpqJobOpt = DEFAULT_SCOPE.qpq_job,
        node_job: NodeJobOpt = DEFAULT_SCOPE.node_job,
        data_mountpoint: MountOpt = None,
        runbook_base_url: RunbookOpt = DEFAULT_RUNBOOK_BASE_URL,
        config: ConfigOpt = None) -> None:
    """prometheus/alerts/qpq-alerts.yml and prometheus/rules/qpq-recording.yml."""
    _run(Artefact.ALERTS, root, check, as_json,
         _settings(qpq_job, node_job, data_mountpoint, runbook_base_url, config))


@app.command("rules-tests")
def rules_tests(root: RootOpt = None, check: CheckOpt = False,
                as_json: JsonOpt = False,
        qpq_job: QpqJobOpt = DEFAULT_SCOPE.qpq_job,
        node_job: NodeJobOpt = DEFAULT_SCOPE.node_job,
        data_mountpoint: MountOpt = None,
        runbook_base_url: RunbookOpt = DEFAULT_RUNBOOK_BASE_URL,
        config: ConfigOpt = None) -> None:
    """prometheus/tests/*.yml: promtool tests driving every alert."""
    _run(Artefact.RULES_TESTS, root, check, as_json,
         _settings(qpq_job, node_job, data_mountpoint, runbook_base_url, config))


@app.command("dashboard")
def dashboard(root: RootOpt = None, check: CheckOpt = False,
              as_json: JsonOpt = False,
        qpq_job: QpqJobOpt = DEFAULT_SCOPE.qpq_job,
        node_job: NodeJobOpt = DEFAULT_SCOPE.node_job,
        data_mountpoint: MountOpt = None,
        runbook_base_url: RunbookOpt = DEFAULT_RUNBOOK_BASE_URL,
        config: ConfigOpt = None) -> None:
    """dashboards/qpq-overview.json (Grafana)."""
    _run(Artefact.DASHBOARD, root, check, as_json,
         _settings(qpq_job, node_job, data_mountpoint, runbook_base_url, config))


@app.command("docs")
def docs(root: RootOpt = None, check: CheckOpt = False, as_json: JsonOpt = False,
        qpq_job: QpqJobOpt = DEFAULT_SCOPE.qpq_job,
        node_job: NodeJobOpt = DEFAULT_SCOPE.node_job,
        data_mountpoint: MountOpt = None,
        runbook_base_url: RunbookOpt = DEFAULT_RUNBOOK_BASE_URL,
        config: ConfigOpt = None) -> None:
    """docs/operations/{monitoring,incident-response,scaling-guide}.md."""
    _run(Artefact.DOCS, root, check, as_json,
         _settings(qpq_job, node_job, data_mountpoint, runbook_base_url, config))


@app.command("all")
def render_all(root: RootOpt = None, check: CheckOpt = False,
               as_json: JsonOpt = False,
        qpq_job: QpqJobOpt = DEFAULT_SCOPE.qpq_job,
        node_job: NodeJobOpt = DEFAULT_SCOPE.node_job,
        data_mountpoint: MountOpt = None,
        runbook_base_url: RunbookOpt = DEFAULT_RUNBOOK_BASE_URL,
        config: ConfigOpt = None) -> None:
    """Every generated file of the bundle."""
    _run(Artefact.ALL, root, check, as_json,
         _settings(qpq_job, node_job, data_mountpoint, runbook_base_url, config))
