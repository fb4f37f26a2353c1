"""`qpq-ops rotate auth-token|tls|federation|db-key|opaque|session-key`: rotate every
secret."""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TextIO

import typer
from rich.table import Table

from qpq_ops._console import fail, out, print_json, warn
from qpq_ops.cli._deployment import deployment_or_fail
from qpq_ops.errors import OpsError
from qpq_ops.exit_codes import ExitCode
from qpq_ops.rotate import (
    RotationResult,
    finish_auth_token,
    finish_opaque,
    read_audit,
    rotate_auth_token,
    rotate_db_key,
    rotate_federation,
    rotate_opaque,
    rotate_tls,
)
from qpq_ops.rotate.auth_token import DEFAULT_GRACE_S
from qpq_ops.rotate.federation import finish_federation
from qpq_ops.rotate.session_key import rotate_session_key
from qpq_ops.rotate.tls import finish_tls, stage_tls
from qpq_server.secrets import Secret

__all__ = ["MIN_TOKEN_CHARS", "app"]

MIN_TOKEN_CHARS = 16
"""Shortest token --token-stdin takes (the qpq_server role's floor for a pinned token)."""
_TOKEN_CHARS = re.compile(r"[^\s\"'#]+")

app = typer.Typer(
    help="Rotate secrets: each command shows its plan with --dry-run, never prints a "
    "secret, and records what/when/fingerprint in DATA_DIR/audit/rotations.jsonl.",
    no_args_is_help=True,
)

ConfigOpt = Annotated[Path, typer.Option("--config", help="The server's qpq-server.toml.")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Show the plan; change nothing.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON alone on stdout.")]
ReloadOpt = Annotated[str | None, typer.Option(
    "--reload-command", help="Reload with this command (e.g. 'systemctl reload qpq-server') "
    "instead of SIGHUP to the pid in the data dir's pid file.")]


def _report(result: RotationResult, json_out: bool) -> None:
    if json_out:
        print_json({"kind": result.kind, "action": result.action, "dry_run": result.dry_run,
                    "fingerprint": result.fingerprint or None,
                    "previous_fingerprint": result.previous_fingerprint or None,
                    "steps": list(result.steps), "next_steps": list(result.next_steps),
                    "reload": result.reload or None, "warnings": list(result.warnings)})
    else:
        title = f"rotate {result.kind}" + (
            f" --{result.action}" if result.action in ("finish", "stage") else "")
        table = Table(title=title + (" (dry run: nothing changed)" if result.dry_run else ""),
                      show_header=False)
        for step in result.steps:
            table.add_row("would" if result.dry_run else "done", step)
        if result.fingerprint:
            table.add_row("new", result.fingerprint)
        if result.previous_fingerprint:
            table.add_row("previous", result.previous_fingerprint)
        if result.reload:
            table.add_row("server", result.reload)
        for step in result.next_steps:
            table.add_row("next", step)
        out().print(table)
        for warning in result.warnings:
            warn(warning)
    raise typer.Exit(int(ExitCode.WARNING if result.warnings else ExitCode.OK))


def _run(action: Callable[[], RotationResult], json_out: bool) -> None:
    try:
        result = action()
    except OpsError as exc:
        fail(str(exc), exc.exit_code)
    _report(result, json_out)


@app.command("auth-token")
def auth_token(
    config: ConfigOpt,
    finish: Annotated[bool, typer.Option(
        "--finish", help="End the grace period: stop accepting the previous token.")] = False,
    grace_hours: Annotated[float, typer.Option(
        "--grace-hours", min=0, help="How long the previous token stays valid.")
    ] = DEFAULT_GRACE_S / 3600,
    force: Annotated[bool, typer.Option(
        "--force", help="With --finish: finish before the grace period ends.")] = False,
    reload_command: ReloadOpt = None,
    token_stdin: Annotated[bool, typer.Option(
        "--token-stdin", help="Rotate to the token read from stdin (one line) instead of a "
        "random one: the same token on every node of a cluster (rotate-keys.yml does this). "
        "At least 16 characters, no whitespace, quotes or '#'.")] = False,
    dry_run: DryRunOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """New random access token; the old one stays valid until --finish.

    The server reloads (SIGHUP) without dropping connections and accepts both tokens
    during the grace period; `--finish` after it drops the old one. The token is written
    to the .env beside the config, never printed."""
    if token_stdin and finish:
        fail("--token-stdin gives the token of a new rotation; it does not go with --finish")
    new_token = _read_token(sys.stdin) if token_stdin else None
    dep = deployment_or_fail(config)
    if finish:
        _run(lambda: finish_auth_token(dep, dry_run=dry_run, force=force,
                                       reload_command=reload_command), json_out)
    _run(lambda: rotate_auth_token(dep, dry_run=dry_run, grace_s=grace_hours * 3600,
                                   reload_command=reload_command, new_token=new_token),
         json_out)


def _read_token(stream: TextIO) -> Secret:
    """The one-line token of --token-stdin, checked to fit a .env line (never echoed)."""
    lines = stream.read().splitlines()
    token = lines[0] if lines else ""
    if len(lines) > 1 and any(line.strip() for line in lines[1:]):
        fail("--token-stdin: expected one line on stdin, got several")
    if len(token) < MIN_TOKEN_CHARS or not _TOKEN_CHARS.fullmatch(token):
        fail(f"--token-stdin: the token must be at least {MIN_TOKEN_CHARS} characters with no "
             "whitespace, quotes or '#' (it is not shown here)")
    return Secret(token)


@app.command("session-key")
def session_key(
    config: ConfigOpt,
    reload_command: ReloadOpt = None,
    dry_run: DryRunOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """New key for signing session tokens: every session ends at once.

    For a leaked session key or a suspected mass theft of sessions. The server reloads
    (SIGHUP) and refuses every token signed with the old key; users log in again. The
    key is written beside the others in the data dir, never printed."""
    dep = deployment_or_fail(config)
    _run(lambda: rotate_session_key(dep, dry_run=dry_run, reload_command=reload_command),
         json_out)


@app.command("tls")
def tls(
    config: ConfigOpt,
    cert: Annotated[Path | None, typer.Option(
        "--cert", help="Install this certificate (PEM chain, leaf first) instead of "
        "generating a self-signed one.")] = None,
    key: Annotated[Path | None, typer.Option("--key", help="Its private key (PEM).")] = None,
    days: Annotated[int, typer.Option("--days", min=1,
                                      help="Validity of a self-signed certificate.")] = 365,
    stage: Annotated[bool, typer.Option(
        "--stage", help="Only make the next self-signed pair and tls/trust-bundle.pem "
        "(current + next) to hand to clients; a later `rotate tls` installs it.")] = False,
    finish: Annotated[bool, typer.Option(
        "--finish", help="Once clients have the new certificate: delete the previous key "
        "and certificate, shrink trust-bundle.pem to the current one.")] = False,
    reload_command: ReloadOpt = None,
    dry_run: DryRunOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """New TLS key and certificate, then a reload that keeps connections.

    Self-signed (use --stage first so pinning clients get a trust bundle), or a provided
    --cert/--key pair checked to match and be valid. New handshakes use it; open
    connections stay up."""
    dep = deployment_or_fail(config)
    if finish:
        _run(lambda: finish_tls(dep, dry_run=dry_run), json_out)
    if stage:
        if cert or key:
            fail("--stage makes a self-signed pair; it takes no --cert/--key", ExitCode.USAGE)
        _run(lambda: stage_tls(dep, dry_run=dry_run, days=days), json_out)
    _run(lambda: rotate_tls(dep, dry_run=dry_run, cert=cert, key=key, days=days,
                            reload_command=reload_command), json_out)


@app.command("federation")
def federation(
    config: ConfigOpt,
    new_ca: Annotated[bool, typer.Option(
        "--new-ca", help="Also replace the federation CA (peers must then trust the new "
        "one: the steps are printed).")] = False,
    days: Annotated[int, typer.Option("--days", min=1, help="Certificate validity.")] = 365,
    finish: Annotated[bool, typer.Option(
        "--finish", help="Once every peer has switched: delete the previous key and CA, "
        "shrink the CA bundle (federation-ca-bundle.pem) to the current CA.")] = False,
    dry_run: DryRunOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """New federation key + certificate signed by the federation CA (made if missing)."""
    dep = deployment_or_fail(config)
    if finish:
        _run(lambda: finish_federation(dep, dry_run=dry_run), json_out)
    _run(lambda: rotate_federation(dep, dry_run=dry_run, new_ca=new_ca, days=days), json_out)


@app.command("db-key")
def db_key(
    config: ConfigOpt,
    backup_dest: Annotated[Path | None, typer.Option(
        "--backup-dest", help="Where the verified pre-rotation backup goes "
        "(default DATA_DIR/pre-rotation-backups).")] = None,
    stop: Annotated[bool, typer.Option(
        "--stop", help="Stop a running server (SIGTERM via its pid file, it drains) "
        "instead of refusing.")] = False,
    finish: Annotated[bool, typer.Option(
        "--finish", help="(db-key has no second step: refused with an explanation)")
    ] = False,
    dry_run: DryRunOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Re-encrypt the database under a new key (PRAGMA rekey).

    With the server stopped (or --stop), after a verified backup; the new key goes to the
    .env atomically, crash-safe (rerun to complete). A wrong current key aborts with
    nothing changed."""
    if finish:
        fail("db-key rotation has no second step; the old key only lives on in the "
             "pre-rotation backup: move that archive to secure storage", ExitCode.USAGE)
    dep = deployment_or_fail(config)
    _run(lambda: rotate_db_key(dep, dry_run=dry_run, backup_dest=backup_dest, stop=stop),
         json_out)


@app.command("opaque")
def opaque(
    config: ConfigOpt,
    finish: Annotated[bool, typer.Option(
        "--finish", help="Retire old setups that no account uses any more.")] = False,
    restart_command: Annotated[str | None, typer.Option(
        "--restart-command", help="Restart the server with this command (it loads setups "
        "only at start), e.g. 'systemctl restart qpq-server'.")] = None,
    dry_run: DryRunOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """New OPAQUE server setup; nobody is locked out.

    Accounts under older setups keep logging in and move to the new one at their next
    login; --finish retires setups no account uses any more. Needs a restart."""
    dep = deployment_or_fail(config)
    if finish:
        _run(lambda: finish_opaque(dep, dry_run=dry_run, restart_command=restart_command),
             json_out)
    _run(lambda: rotate_opaque(dep, dry_run=dry_run, restart_command=restart_command),
         json_out)


@app.command("audit")
def audit(config: ConfigOpt, json_out: JsonOpt = False) -> None:
    """Show the rotation audit log (what, when, who, fingerprints; never secrets)."""
    dep = deployment_or_fail(config)
    records = read_audit(dep.data_dir)
    if json_out:
        print_json({"records": [{"time": r.time, "kind": r.kind, "action": r.action,
                                 "fingerprint": r.fingerprint or None,
                                 "previous_fingerprint": r.previous_fingerprint or None,
                                 "user": r.user, "host": r.host, "details": r.details}
                                for r in records]})
        return
    table = Table(title=f"rotations of {dep.data_dir}")
    for col in ("time (UTC)", "kind", "action", "fingerprint", "user"):
        table.add_column(col)
    for r in records:
        table.add_row(r.time[:19], r.kind, r.action, r.fingerprint, r.user)
    out().print(table)
