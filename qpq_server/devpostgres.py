"""A real, throw-away PostgreSQL from the Debian `postgresql` package, for tests and bench/.

`initdb` into a fresh temp dir, `postgres` on a free loopback port with its unix socket in
that dir, stopped (and the dir removed) after. PostgreSQL refuses to run as root, so as
root the binaries run as `nobody` (through `runuser`). Each test gets its own database
(`new_database`), so tests never see each other's rows.
"""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from qpq_server.devserver import free_port

__all__ = ["USER", "PostgresCluster", "pg_bindir", "postgres_cluster"]

USER = "qpq"  # the superuser initdb creates (trust auth on the loopback and socket only)
_RUN_AS = "nobody"
_counter = itertools.count()


def pg_bindir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parent.parent.name))
    if not found:
        raise RuntimeError("PostgreSQL binaries not found under /usr/lib/postgresql: "
                           "run `make sysdeps` (scripts/install-sysdeps.sh installs postgresql)")
    return Path(found[-1]).parent


@dataclass
class PostgresCluster:
    bindir: Path
    datadir: Path
    port: int
    log_path: Path
    running: bool = False
    _dbs: list[str] = field(default_factory=list)

    def _cmd(self, *argv: str) -> list[str]:
        if os.geteuid() == 0:
            return ["runuser", "-u", _RUN_AS, "--", *argv]
        return list(argv)

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{dbname}"

    def start(self) -> None:
        opts = (f"-p {self.port} -c listen_addresses=127.0.0.1 "
                f"-c unix_socket_directories={self.datadir} -c max_connections=200")
        subprocess.run(self._cmd(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-o",
                                 opts, "-l", str(self.log_path), "-w", "-t", "60", "start"),
                       check=True, capture_output=True, timeout=90)
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        if not self.running:
            return
        subprocess.run(self._cmd(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m",
                                 mode, "-w", "-t", "60", "stop"),
                       check=True, capture_output=True, timeout=90)
        self.running = False

    def new_database(self) -> str:
        """A fresh, empty database; returns its DSN."""
        name = f"t{os.getpid()}_{next(_counter)}"
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        self._dbs.append(name)
        return self.dsn(name)


@contextmanager
def postgres_cluster() -> Iterator[PostgresCluster]:
    bindir = pg_bindir()
    # Not under pytest's tmp dirs: those are 0700 root, which `nobody` cannot enter.
    base = Path(tempfile.mkdtemp(prefix="qpq-pg-"))
    base.chmod(0o755)
    datadir = base / "data"
    datadir.mkdir(mode=0o700)
    if os.geteuid() == 0:
        shutil.chown(base, _RUN_AS)
        shutil.chown(datadir, _RUN_AS)
    cluster = PostgresCluster(bindir, datadir, free_port(), base / "postgres.log")
    try:
        subprocess.run(cluster._cmd(str(bindir / "initdb"), "-D", str(datadir), "-U", USER,
                                    "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync"),
                       check=True, capture_output=True, timeout=120)
        cluster.start()
        deadline = time.monotonic() + 30
        while True:  # pg_ctl -w waited already; this also proves TCP on the port answers
            try:
                psycopg.connect(cluster.dsn(), connect_timeout=2).close()
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield cluster
    finally:
        try:
            cluster.stop("immediate")
        finally:
            shutil.rmtree(base, ignore_errors=True)
