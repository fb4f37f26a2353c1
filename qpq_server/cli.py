"""`qpq-server`: init a data dir, check a config, run the server."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from qpq_server.errors import QpqError

__all__ = ["app", "main"]

app = typer.Typer(
    name="qpq-server",
    help="The qpq end-to-end-encrypted messaging server (QUIC, ALPN qpq/1).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _fail(message: str, code: int = 1) -> typer.Exit:
    print(f"qpq-server: error: {message}", file=sys.stderr)
    return typer.Exit(code)


@app.command()
def init(
    data_dir: Annotated[Path, typer.Option("--data-dir", help="Directory to initialise.")],
    domain: Annotated[str, typer.Option(help="Server domain (TLS name).")] = "localhost",
    join: Annotated[Path | None, typer.Option(
        "--join", metavar="EXISTING_DATA_DIR",
        help="Make a new node of the cluster that EXISTING_DATA_DIR's node belongs to: own "
        "TLS certificate, the cluster's secrets and config copied (its [storage] backend "
        "must be postgres). --domain is taken from it.")] = None,
) -> None:
    """Create DIR/qpq-server.toml, a self-signed TLS cert, DIR/.env (0600) with a random
    QPQ_AUTH_TOKEN and QPQ_DB_KEY, the OPAQUE server setup and the server's keys.
    Refuses to overwrite an initialised dir."""
    from qpq_server.datadir import init_data_dir, join_data_dir

    try:
        written = (join_data_dir(data_dir, join) if join is not None
                   else init_data_dir(data_dir, domain))
    except QpqError as exc:
        raise _fail(str(exc)) from None
    except OSError as exc:
        raise _fail(f"cannot write {exc.filename}: {exc.strerror}") from None
    for path in written:
        print(f"wrote {path}")
    print(f"start it with: qpq-server run --config {written[0]}")


@app.command("check-config")
def check_config(
    path: Annotated[Path, typer.Argument(help="The qpq-server.toml to validate.")],
) -> None:
    """Validate a config file (unknown keys, types, ranges, referenced files) without
    starting anything. Exit 0 when valid, 1 with one line per problem otherwise."""
    from qpq_server.config import validate_config

    problems = validate_config(path)
    if problems:
        for problem in problems:
            print(f"{path}: {problem}", file=sys.stderr)
        raise typer.Exit(1)
    print(f"{path}: ok")


@app.command()
def run(
    config: Annotated[Path | None, typer.Option(
        "--config", help="Config file (default: $QPQ_CONFIG). Secrets come from the "
        "environment or the .env beside it.")] = None,
) -> None:
    """Serve QUIC clients until SIGTERM (graceful drain); SIGHUP reloads access tokens
    and the TLS certificate without dropping connections."""
    from qpq_server.app import run_server
    from qpq_server.logs import setup_logging

    path = config or (Path(os.environ["QPQ_CONFIG"]) if os.environ.get("QPQ_CONFIG") else None)
    if path is None:
        raise _fail("no config: pass --config PATH or set QPQ_CONFIG", 64)
    setup_logging(os.environ.get("QPQ_LOG_LEVEL", "info"))
    # Whatever the server creates (database, WAL, shared memory, pid, blobs) is private
    # to its user, whatever the shell's umask.
    os.umask(0o077)
    try:
        if _worker_count(path) > 1:
            from qpq_server.supervisor import Supervisor

            raise typer.Exit(Supervisor(path).run())
        run_server(path)
    except QpqError as exc:
        raise _fail(str(exc)) from None
    except KeyboardInterrupt:
        pass


def _worker_count(path: Path) -> int:
    from qpq_server.config import load_config

    return load_config(path).server.worker_count


def main() -> None:
    app()
