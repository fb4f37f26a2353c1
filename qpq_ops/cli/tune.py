"""`qpq-ops tune sysctl|ulimits`: print, write or check the host settings QUIC needs."""

from __future__ import annotations

import os
import resource
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from qpq_ops._console import err, fail, out, print_json, styled
from qpq_ops.capacity import NOFILE, SYSCTL
from qpq_ops.exit_codes import ExitCode, worst
from qpq_ops.tuning import (
    LIMITS_D_PATH,
    SYSCTL_PATH,
    SYSTEMD_DROPIN_PATH,
    CheckState,
    SettingCheck,
    check_nofile,
    check_sysctl,
    render_limits_d,
    render_sysctl_conf,
    render_systemd_dropin,
    write_atomic,
)
from qpq_server.config import load_config
from qpq_server.errors import ConfigError

__all__ = ["app", "checks_exit_code", "checks_json", "sysctl", "ulimits"]

app = typer.Typer(
    help="Host tuning for QUIC: UDP buffers (sysctl) and the open-files limit. "
    "Prints the recommended files; changes nothing unless --write is given.",
    no_args_is_help=True,
)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON alone on stdout.")]
DryRunOpt = Annotated[bool, typer.Option(
    "--dry-run", help="With --write: only report whether the file would change "
    "(\"changed\" in --json); write nothing.")]


_EXIT = {CheckState.OK: ExitCode.OK, CheckState.BELOW: ExitCode.WARNING,
         CheckState.UNKNOWN: ExitCode.CANNOT_EVALUATE}


def checks_exit_code(checks: list[SettingCheck]) -> ExitCode:
    """1 when any setting is below, else 3 when any could not be read, else 0."""
    return worst(_EXIT[c.state] for c in checks)


def _live_json(value: int | None) -> int | str | None:
    return "unlimited" if value == resource.RLIM_INFINITY else value


def checks_json(checks: list[SettingCheck]) -> list[dict[str, object]]:
    return [
        {"name": c.name, "recommended": c.recommended, "live": _live_json(c.live),
         "state": str(c.state), "fix": c.fix}
        for c in checks
    ]


def _print_checks(checks: list[SettingCheck], title: str) -> None:
    table = Table(title=title, title_justify="left")
    table.add_column("setting")
    table.add_column("recommended", justify="right")
    table.add_column("live", justify="right")
    table.add_column("state")
    for c in checks:
        live = "?" if c.live is None else str(_live_json(c.live))
        style = {"ok": "green", "below": "yellow", "unknown": "magenta"}[c.state]
        table.add_row(c.name, str(c.recommended), live, styled(str(c.state), style))
    out().print(table)
    below = [c for c in checks if c.state is not CheckState.OK]
    if below:
        out().print(f"Fix: {below[0].fix}", highlight=False, soft_wrap=True)


def _server_pid(pid: int | None, pid_file: Path | None, config: Path | None,
                itself: bool) -> tuple[int | None, str]:
    """(pid to check, who it is) from the options; None = this process (--self)."""
    given = [name for name, value in (("--pid", pid), ("--pid-file", pid_file),
                                      ("--config", config)) if value is not None]
    if itself:
        if given:
            fail(f"--self and {given[0]} name different processes; give one")
        return None, "qpq-ops itself, not the server"
    if len(given) > 1:
        fail(f"give one of --pid, --pid-file, --config (got {', '.join(given)})")
    if pid is not None:
        if pid <= 0:
            fail(f"--pid: must be a positive process id, got {pid}")
        return pid, f"pid {pid}"
    if config is None and pid_file is None:
        env = os.environ.get("QPQ_CONFIG")
        if not env:
            fail("--check needs the running server: give --pid, --pid-file or --config "
                 "(or set QPQ_CONFIG); --self checks this shell instead")
        config = Path(env)
    if config is not None:
        try:
            pid_file = load_config(config).pid_path
        except (OSError, ConfigError) as exc:
            fail(f"--config {config}: {exc}")
    assert pid_file is not None
    try:
        text = pid_file.read_text().strip()
    except FileNotFoundError:
        fail(f"no pid file {pid_file}: is the server running?", ExitCode.CANNOT_EVALUATE)
    except OSError as exc:
        fail(f"cannot read {pid_file}: {exc.strerror or exc}", ExitCode.CANNOT_EVALUATE)
    if not text.isdigit() or int(text) <= 0:
        fail(f"{pid_file} does not hold a process id: {text[:40]!r}",
             ExitCode.CANNOT_EVALUATE)
    return int(text), f"server pid {text}"


_FILE_MODE = 0o644


def _up_to_date(path: Path, text: str) -> bool:
    try:
        return (path.read_text() == text
                and path.stat().st_mode & 0o777 == _FILE_MODE)
    except (OSError, UnicodeDecodeError):
        return False


def _write(path: Path, text: str, dry_run: bool) -> bool:
    """Write `text` to `path` unless it already holds it (mode 0644); True when it changed
    or, with dry_run, would change. An up-to-date file is left alone, so configuration
    managers calling --write see "changed" only when something did."""
    if _up_to_date(path, text):
        err().print(f"{path} is up to date", highlight=False)
        return False
    if dry_run:
        err().print(f"would write {path}", highlight=False)
        return True
    try:
        write_atomic(path, text, mode=_FILE_MODE)
    except OSError as exc:
        fail(f"cannot write {path}: {exc.strerror or exc}", ExitCode.CANNOT_EVALUATE)
    err().print(f"wrote {path}", highlight=False)
    return True


@app.command("sysctl")
def sysctl(
    write: Annotated[Path | None, typer.Option(
        "--write", metavar="PATH",
        help=f"Write the file atomically to PATH (e.g. {SYSCTL_PATH}; then run "
        "`sysctl -p PATH`).")] = None,
    check: Annotated[bool, typer.Option(
        "--check", help="Compare with the live values; exit 1 when any is below.")] = False,
    proc_sys: Annotated[Path, typer.Option(
        "--proc-sys", metavar="DIR", help="Where live values are read from.")] = Path("/proc/sys"),
    dry_run: DryRunOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """UDP socket buffers for QUIC (net.core.rmem/wmem max and default).

    Without options, prints the recommended /etc/sysctl.d/99-qpq.conf. --write leaves
    an up-to-date file alone; --json then says which files "changed".
    """
    if dry_run and write is None:
        fail("--dry-run needs --write PATH (it reports whether that file would change)")
    text = render_sysctl_conf()
    changed = [str(write)] if write is not None and _write(write, text, dry_run) else []
    if check:
        checks = check_sysctl(proc_sys)
        if json_out:
            print_json({"file": str(SYSCTL_PATH), "settings": SYSCTL, "changed": changed,
                        "checks": checks_json(checks)})
        else:
            _print_checks(checks, f"sysctl (live from {proc_sys})")
        raise typer.Exit(int(checks_exit_code(checks)))
    if json_out:
        print_json({"file": str(SYSCTL_PATH), "settings": SYSCTL, "content": text,
                    "changed": changed})
    elif write is None:
        sys.stdout.write(text)


@app.command("ulimits")
def ulimits(
    write: Annotated[Path | None, typer.Option(
        "--write", metavar="PATH",
        help=f"Write the systemd drop-in atomically to PATH (e.g. {SYSTEMD_DROPIN_PATH}).",
    )] = None,
    write_limits_d: Annotated[Path | None, typer.Option(
        "--write-limits-d", metavar="PATH",
        help=f"Write the pam_limits file atomically to PATH (e.g. {LIMITS_D_PATH}).",
    )] = None,
    check: Annotated[bool, typer.Option(
        "--check", help="Compare the soft/hard open-files limits with 65536; exit 1 when "
        "below.")] = False,
    pid: Annotated[int | None, typer.Option(
        help="With --check: the running server's pid.")] = None,
    pid_file: Annotated[Path | None, typer.Option(
        "--pid-file", metavar="PATH", help="With --check: read the server's pid from PATH.",
    )] = None,
    config: Annotated[Path | None, typer.Option(
        "--config", metavar="PATH", help="With --check: the server's qpq-server.toml; its "
        "pid file (in the data dir) names the running server. Default: $QPQ_CONFIG.",
    )] = None,
    itself: Annotated[bool, typer.Option(
        "--self", help="With --check: check qpq-ops's own limits (the shell's), not the "
        "server's.")] = False,
    proc: Annotated[Path, typer.Option(
        "--proc", metavar="DIR", help="Where /proc/PID/limits is read from.")] = Path("/proc"),
    proc_sys: Annotated[Path, typer.Option(
        "--proc-sys", metavar="DIR", help="Where fs.nr_open is read from.")] = Path("/proc/sys"),
    user: Annotated[str, typer.Option(help="Service user named in the limits.d file.")] = "qpq",
    dry_run: DryRunOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Open-files limit (LimitNOFILE=65536): systemd drop-in and limits.d file.

    Without options, prints both recommended files. `--check` reads the limits of the
    running server (--pid, --pid-file or --config; $QPQ_CONFIG by default), not of
    this shell, and the kernel's fs.nr_open; the fix it prints works for the user
    running it (a non-root user can raise the soft limit up to the hard one only).
    --write/--write-limits-d leave an up-to-date file alone; --json then says which
    files "changed".
    """
    if dry_run and write is None and write_limits_d is None:
        fail("--dry-run needs --write or --write-limits-d (it reports whether those files "
             "would change)")
    dropin, limits_d = render_systemd_dropin(), render_limits_d(user)
    changed = [str(path) for path, text in ((write, dropin), (write_limits_d, limits_d))
               if path is not None and _write(path, text, dry_run)]
    if check:
        target, who = _server_pid(pid, pid_file, config, itself)
        checks = check_nofile(target, proc, who=who, proc_sys=proc_sys)
        if json_out:
            print_json({"nofile": NOFILE, "pid": target, "changed": changed,
                        "checks": checks_json(checks)})
        else:
            _print_checks(checks, "open-files limit")
        raise typer.Exit(int(checks_exit_code(checks)))
    if json_out:
        print_json({"nofile": NOFILE, "changed": changed,
                    "files": {str(SYSTEMD_DROPIN_PATH): dropin, str(LIMITS_D_PATH): limits_d}})
    elif write is None and write_limits_d is None:
        sys.stdout.write(
            f"# --- {SYSTEMD_DROPIN_PATH}\n{dropin}\n# --- {LIMITS_D_PATH}\n{limits_d}"
        )
