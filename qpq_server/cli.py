"""`qpq-server`: init a data dir, check a config, run the server."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
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
    from qpq_server.config import load_config, validate_config
    from qpq_server.federation.check import federation_file_problems

    problems = validate_config(path)
    if not problems:  # the files exist: now whether they fit together
        problems = federation_file_problems(load_config(path))
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


federation_app = typer.Typer(
    name="federation", no_args_is_help=True,
    help="Certificates for federation: servers of different domains relay to each other "
    "over mutual TLS, each presenting a certificate the shared federation CA signed.")
app.add_typer(federation_app)


@federation_app.command("init-ca")
def federation_init_ca(
    out: Annotated[Path, typer.Option("--out", help="Directory for federation-ca.der and "
                                      "federation-ca-key.der (0600; keep it offline).")],
    days: Annotated[int, typer.Option(min=1, help="CA validity in days.")] = 3650,
) -> None:
    """Create a federation CA. Give its certificate (never its key) to every peer's
    [federation] federation_ca; sign each domain's certificate with `issue-cert`."""
    from qpq_server.federation.certs import init_ca

    _print_written(lambda: init_ca(out, days=days))


@federation_app.command("issue-cert")
def federation_issue_cert(
    ca: Annotated[Path, typer.Option("--ca", help="Directory holding the CA (init-ca --out).")],
    domain: Annotated[str, typer.Option("--domain", help="The server domain the certificate "
                                        "names: [federation] domain of that server.")],
    out: Annotated[Path, typer.Option("--out", help="Directory for federation-cert.der and "
                                      "federation-key.der (0600).")],
    days: Annotated[int, typer.Option(min=1, help="Validity in days (capped by the CA's).")]
    = 365,
) -> None:
    """Issue a certificate and key for DOMAIN, signed by the federation CA. Point
    [federation] federation_cert / federation_key at them."""
    from qpq_server.federation.certs import issue_cert

    _print_written(lambda: issue_cert(ca, domain, out, days=days))


def _print_written(make: Callable[[], list[Path]]) -> None:
    try:
        written = make()
    except QpqError as exc:
        raise _fail(str(exc)) from None
    except OSError as exc:
        raise _fail(f"cannot write {exc.filename}: {exc.strerror}") from None
    for path in written:
        print(f"wrote {path}")


def _worker_count(path: Path) -> int:
    from qpq_server.config import load_config

    return load_config(path).server.worker_count


def main() -> None:
    app()
