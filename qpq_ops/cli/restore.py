"""`qpq-ops restore ARCHIVE --config PATH`: verify, restore, purge key packages, check."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from qpq_ops._console import err, fail, out, print_json, styled_state
from qpq_ops.backup import RestoreRequest, RestoreResult, restore_archive, resume_restore
from qpq_ops.cli._deployment import deployment_or_fail
from qpq_ops.cli.backup import IdentityOpt, identities_from, progress_bar
from qpq_ops.errors import OpsError
from qpq_ops.exit_codes import ExitCode

__all__ = ["restore"]


def _result_json(result: RestoreResult) -> dict[str, object]:
    m = result.manifest
    return {
        "archive_created_at": m.created_at if m else None,
        "schema_version": m.schema_version if m else None,
        "row_counts": m.row_counts if m else None,
        "aside_dir": str(result.aside_dir) if result.aside_dir else None,
        "purged_key_packages": result.purged_key_packages,
        "rekeyed": result.rekeyed, "migrated_from": result.migrated_from,
        "secrets_restored": result.secrets_restored,
        "env_key_written": result.env_key_written,
        "aside_schema": result.aside_schema,
        "recovered": result.recovered,
        "doctor": {"ok": result.doctor.ok,
                   "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail}
                              for c in result.doctor.checks]},
    }


def _print_result(result: RestoreResult) -> None:
    table = Table(title="post-restore doctor")
    table.add_column("check")
    table.add_column("state")
    table.add_column("found")
    for check in result.doctor.checks:
        table.add_row(check.name, styled_state("ok" if check.ok else "critical"), check.detail)
    out().print(table)
    console = err()
    if result.recovered:
        console.print(result.recovered)
    if result.aside_dir:
        console.print(f"previous data moved aside to {result.aside_dir} (delete it yourself "
                      "once the restored server is confirmed good)")
    if result.aside_schema:
        console.print(f"previous tables moved into the database schema {result.aside_schema} "
                      f"(DROP SCHEMA {result.aside_schema} CASCADE once the restore is "
                      "confirmed good)")
    console.print(f"purged {result.purged_key_packages} one-time key packages; clients "
                  "upload fresh ones at their next login")
    if result.rekeyed:
        console.print("the restored database was re-encrypted to this data dir's QPQ_DB_KEY")
    if result.migrated_from is not None:
        console.print(f"schema migrated from version {result.migrated_from}")
    if result.env_key_written:
        console.print("QPQ_DB_KEY was missing from the .env beside the config and was added")


def restore(
    archive: Annotated[Path | None, typer.Argument(
        help="Archive made by `qpq-ops backup create` (omit with --resume).")] = None,
    config: Annotated[Path, typer.Option("--config", help="The server's qpq-server.toml; "
                                         "its data dir is restored into.")] = Path(
        "qpq-server.toml"),
    force: Annotated[bool, typer.Option(
        "--force", help="Restore over a data dir that holds data (moved aside, never "
        "deleted) or from another schema version (migrations run).")] = False,
    with_secrets: Annotated[bool, typer.Option(
        "--with-secrets", help="Also put the archive's secrets (.env, TLS, keys) in place; "
        "the old ones are moved aside.")] = False,
    identity: IdentityOpt = None,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Finish an interrupted restore (roll back one killed while "
        "placing files, run the key-package purge) and run the doctor.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON alone on stdout.")
                        ] = False,
) -> None:
    """Restore a backup into the config's data dir, then check it.

    The archive is verified in full first (checksums, key, integrity); a running server
    or a data dir holding data is refused (the latter unless --force, which moves the old
    data aside, never deletes it); one-time key packages are purged so none is ever
    handed out twice; a doctor then checks every row and blob. The database key comes
    from QPQ_DB_KEY in the environment, the archive (if it holds secrets) or the .env; the
    restored database ends up under the .env's key. With the postgres backend the dump is
    loaded into QPQ_DATABASE_URL in one transaction (old tables moved into a schema
    pre_restore_<time> with --force; refused while other sessions use the database).
    Example:

        QPQ_DB_KEY=... qpq-ops restore ARCHIVE --config /var/lib/qpq/qpq-server.toml

    Exit 0 restored and healthy, 2 archive damaged or doctor failed, 3 wrong key or I/O
    failure, 64 refused."""
    dep = deployment_or_fail(config)
    try:
        if resume:
            result = resume_restore(dep)
        elif archive is None:
            fail("give the ARCHIVE to restore (or --resume)", ExitCode.USAGE)
        else:
            request = RestoreRequest(archive, dep, force=force, with_secrets=with_secrets,
                                     identities=identities_from(identity))
            size = archive.stat().st_size if archive.exists() else None
            with progress_bar("restoring", size) as advance:
                result = restore_archive(request, advance)
    except OpsError as exc:
        fail(str(exc), exc.exit_code)
    if json_out:
        print_json(_result_json(result))
    else:
        _print_result(result)
    raise typer.Exit(int(ExitCode.OK if result.doctor.ok else ExitCode.CRITICAL))
