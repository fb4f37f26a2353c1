"""`qpq-ops backup create|list|verify|prune`: online backups of a qpq deployment."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

from qpq_ops._console import err, fail, out, print_json, styled, warn
from qpq_ops.backup import (
    BackupRequest,
    apply_prune,
    create_backup,
    list_archives,
    plan_prune,
    verify_archive,
)
from qpq_ops.backup.age import decode_recipient, load_identities
from qpq_ops.backup.archive import is_encrypted
from qpq_ops.backup.create import planned_bytes
from qpq_ops.backup.textfile import DEFAULT_TEXTFILE_DIR
from qpq_ops.cli._deployment import deployment_or_fail
from qpq_ops.errors import OpsError
from qpq_ops.exit_codes import ExitCode
from qpq_server.secrets import Secret

__all__ = ["IdentityOpt", "app", "identities_from", "progress_bar"]

app = typer.Typer(
    help="Online, consistent backups: the encrypted database (SQLite backup API, never a "
    "raw copy of a live WAL file; with the postgres backend a pg_dump of one snapshot), "
    "the blob store and the OPAQUE setups; secrets only "
    "with --include-secrets. Each archive carries a manifest with sha256 of every member.",
    no_args_is_help=True,
)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON alone on stdout.")]
ConfigOpt = Annotated[Path, typer.Option("--config", help="The server's qpq-server.toml.")]
IdentityOpt = Annotated[Path | None, typer.Option(
    "--identity", metavar="FILE",
    help="age identity file (age-keygen output) to read an encrypted .tar.age archive.")]


def identities_from(path: Path | None) -> tuple[X25519PrivateKey, ...]:
    return tuple(load_identities(path)) if path else ()


@contextmanager
def progress_bar(description: str, total: int | None) -> Iterator[Callable[[int], None]]:
    """A byte progress bar on stderr (only drawn on a terminal); yields `advance(n)`."""
    console = err()
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), TimeRemainingColumn(), console=console,
                  transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n: progress.update(task, advance=n)


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


@app.command("create")
def create(
    config: ConfigOpt,
    dest: Annotated[Path, typer.Option("--dest", help="Directory the archive is written to.")],
    include_secrets: Annotated[bool, typer.Option(
        "--include-secrets",
        help="Also archive .env (DB key, auth token), TLS, KT/session/federation keys. Keep "
        "such archives apart from data backups: a key beside its data protects nothing.")
    ] = False,
    textfile_dir: Annotated[Path | None, typer.Option(
        "--textfile-dir",
        help="node_exporter textfile collector dir for qpq_backup_last_success_timestamp_"
        f"seconds (default {DEFAULT_TEXTFILE_DIR}, skipped with a warning if absent).")
    ] = None,
    no_textfile: Annotated[bool, typer.Option(
        "--no-textfile", help="Do not write the textfile metric.")] = False,
    encrypt_to: Annotated[list[str] | None, typer.Option(
        "--encrypt-to", metavar="AGE_RECIPIENT",
        help="Encrypt the archive to this age recipient (age1..., from age-keygen; "
        "repeatable). Writes ARCHIVE.tar.age; decrypt with `age -d -i KEY` or give "
        "--identity KEY to verify/restore.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Back up a running server without stopping it.

    The database is copied through SQLite's online backup API inside one read
    transaction (consistent, still encrypted, the server never blocked); blobs and OPAQUE
    setups follow; everything is hashed into the manifest; the archive is written under a
    temp name and renamed. Then qpq_backup_last_success_timestamp_seconds is written to
    the textfile dir. Example:

        qpq-ops backup create --config /var/lib/qpq/qpq-server.toml --dest /var/backups/qpq

    Exit 0 on success, 1 if the metric could not be placed, 3 when the backup could not
    be written (nothing is left under the final name), 64 on bad usage."""
    dep = deployment_or_fail(config)
    warnings: list[str] = []
    metrics_dir: Path | None = None
    if not no_textfile:
        if textfile_dir is not None:
            metrics_dir = textfile_dir
        elif DEFAULT_TEXTFILE_DIR.is_dir():
            metrics_dir = DEFAULT_TEXTFILE_DIR
        else:
            warnings.append(f"{DEFAULT_TEXTFILE_DIR} does not exist: backup metric not "
                            "written (pass --textfile-dir)")
    try:
        recipients = tuple(decode_recipient(r) for r in encrypt_to or ())
        request = BackupRequest(dep, dest, include_secrets, metrics_dir, recipients)
        total = planned_bytes(dep, include_secrets)
        with progress_bar("backing up", total) as advance:
            result = create_backup(request, advance)
    except OpsError as exc:
        fail(str(exc), exc.exit_code)
    warnings += result.warnings
    m = result.manifest
    rate = result.size_bytes / 1e6 / result.duration_s if result.duration_s > 0 else 0.0
    if json_out:
        print_json({
            "archive": str(result.archive), "size_bytes": result.size_bytes,
            "duration_seconds": round(result.duration_s, 3), "mb_per_s": round(rate, 1),
            "server_version": m.server_version, "schema_version": m.schema_version,
            "created_at": m.created_at, "snapshot_at_unix": m.snapshot_at_unix,
            "includes_secrets": m.includes_secrets, "row_counts": m.row_counts,
            "members": len(m.members), "encrypted": bool(encrypt_to),
            "metrics_file": str(result.metrics_file) if result.metrics_file else None,
            "warnings": warnings,
        })
    else:
        table = Table(title=f"backup {result.archive.name}", show_header=False)
        table.add_row("archive", str(result.archive))
        table.add_row("size", _mb(result.size_bytes))
        table.add_row("duration", f"{result.duration_s:.2f} s ({rate:,.1f} MB/s)")
        table.add_row("schema / server", f"{m.schema_version} / {m.server_version}")
        table.add_row("rows", ", ".join(f"{k} {v}" for k, v in m.row_counts.items()))
        table.add_row("secrets", "included" if m.includes_secrets else "not included")
        table.add_row("metric", str(result.metrics_file or "not written"))
        out().print(table)
        for warning in warnings:
            warn(warning)
    if warnings:
        raise typer.Exit(int(ExitCode.WARNING))


@app.command("list")
def list_command(
    directory: Annotated[Path, typer.Argument(help="Directory holding backup archives.")],
    json_out: JsonOpt = False,
) -> None:
    """List the archives in DIRECTORY, newest first, with what their manifests say."""
    try:
        infos = list_archives(directory)
    except OpsError as exc:
        fail(str(exc), exc.exit_code)
    if json_out:
        print_json({"archives": [{
            "path": str(i.path), "created_at": i.created.isoformat(),
            "size_bytes": i.size_bytes, "readable": i.manifest is not None,
            "encrypted": is_encrypted(i.path),
            "problem": i.problem or None,
            "server_version": i.manifest.server_version if i.manifest else None,
            "schema_version": i.manifest.schema_version if i.manifest else None,
            "includes_secrets": i.manifest.includes_secrets if i.manifest else None,
            "row_counts": i.manifest.row_counts if i.manifest else None,
        } for i in infos]})
        return
    table = Table(title=f"backups in {directory}")
    for col in ("archive", "created (UTC)", "size", "server", "schema", "secrets",
                "messages"):
        table.add_column(col, justify="right" if col in ("size", "messages") else "left")
    for i in infos:
        m = i.manifest
        table.add_row(
            i.path.name, i.created.strftime("%Y-%m-%d %H:%M:%S"), _mb(i.size_bytes),
            m.server_version if m else (
                styled("encrypted", "yellow") if is_encrypted(i.path)
                else styled("unreadable", "red")),
            str(m.schema_version) if m else "",
            ("yes" if m.includes_secrets else "no") if m else "",
            str(m.row_counts.get("messages", "")) if m else "")
    out().print(table)


@app.command("verify")
def verify(
    archive: Annotated[Path, typer.Argument(help="The archive to check.")],
    config: Annotated[Path | None, typer.Option(
        "--config", help="Read QPQ_DB_KEY from the .env beside this config "
        "(else from the environment). Without a key only checksums are checked.")] = None,
    identity: IdentityOpt = None,
    work_dir: Annotated[Path | None, typer.Option(
        "--work-dir", help="Scratch dir for the extracted copy (default: beside the "
        "archive); needs about the archive's size free.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Check an archive as a restore would, without touching any data dir.

    Checksums of every member, blob hashes, then with the key (QPQ_DB_KEY, or the .env
    beside --config) the manifest MAC, the database opening, cipher_integrity_check,
    integrity_check and row counts. Exit 0 all good, 1 checksums good but no key to open
    the database, 2 damaged, 3 wrong key."""
    db_key = deployment_or_fail(config).db_key() if config else None
    if db_key is None:
        raw = os.environ.get("QPQ_DB_KEY")
        db_key = Secret(raw) if raw else None
    try:
        with progress_bar("verifying", archive.stat().st_size if archive.exists() else None,
                          ) as advance:
            report = verify_archive(archive, db_key, work_dir, progress=advance,
                                    identities=identities_from(identity))
    except OpsError as exc:
        fail(str(exc), exc.exit_code)
    if not report.ok:
        code = ExitCode.CRITICAL
    elif not report.database_checked:
        code = ExitCode.WARNING
    else:
        code = ExitCode.OK
    if json_out:
        print_json({"archive": str(archive), "ok": report.ok,
                    "database_checked": report.database_checked,
                    "members_checked": report.members_checked,
                    "problems": list(report.problems),
                    "schema_version": report.manifest.schema_version,
                    "domain": report.manifest.domain,
                    "row_counts": report.manifest.row_counts})
    else:
        for problem in report.problems:
            warn(problem, "problem:", "bold red")
        if report.ok:
            what = ("checksums, database key and integrity" if report.database_checked
                    else "checksums only (no QPQ_DB_KEY: database not opened)")
            out().print(styled("ok ", "green") + Text(
                f"{archive.name}: {report.members_checked} members, {what}"))
        else:
            out().print(styled("damaged ", "bold red")
                        + Text(f"{archive.name}: {len(report.problems)} problems"))
    raise typer.Exit(int(code))


@app.command("prune")
def prune(
    directory: Annotated[Path, typer.Argument(help="Directory holding backup archives.")],
    keep_last: Annotated[int, typer.Option("--keep-last", "--keep", min=0,
                                           help="Keep the N newest archives.")] = 7,
    keep_daily: Annotated[int, typer.Option(
        "--keep-daily", min=0,
        help="Also keep the newest archive of each of the D most recent days.")] = 14,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only show the plan.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Delete old archives, keeping the newest N plus one a day for D days.

    Only files named like qpq archives are considered; others are never touched."""
    if keep_last == 0 and keep_daily == 0:
        fail("--keep-last 0 --keep-daily 0 would delete every backup; keep at least one",
             ExitCode.USAGE)
    try:
        plan = plan_prune(list_archives(directory), keep_last, keep_daily)
        if not dry_run:
            apply_prune(plan)
    except OpsError as exc:
        fail(str(exc), exc.exit_code)
    if json_out:
        print_json({"dry_run": dry_run, "keep": [str(a.path) for a in plan.keep],
                    "delete": [str(a.path) for a in plan.delete],
                    "removed": [] if dry_run else [str(a.path) for a in plan.delete]})
        return
    table = Table(title=f"prune {directory}" + (" (dry run)" if dry_run else ""))
    table.add_column("archive")
    table.add_column("created (UTC)")
    table.add_column("action")
    for a in sorted((*plan.keep, *plan.delete), key=lambda a: a.created, reverse=True):
        action = "keep" if a in plan.keep else ("would delete" if dry_run else "deleted")
        table.add_row(a.path.name, a.created.strftime("%Y-%m-%d %H:%M:%S"), action)
    out().print(table)

