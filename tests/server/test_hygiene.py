"""Secrets and data hygiene: private data files, throttled repeated logs, and a warning
for an access token given on the command line."""

from __future__ import annotations

import logging
import os
import stat
import subprocess
from pathlib import Path

from qpq_server.logs import RepeatFilter
from tests.helpers.server import BIN, running_server


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_database_wal_shm_and_pid_file_are_private_whatever_the_umask(
        tmp_path: Path) -> None:
    old = os.umask(0o022)  # the server must not inherit a permissive umask
    try:
        with running_server(tmp_path) as srv:
            files = [srv.data_dir / name for name in ("qpq.db", "qpq.db-wal", "qpq.db-shm",
                                                      "qpq-server.pid")]
            present = [p for p in files if p.exists()]
            assert srv.data_dir / "qpq.db" in present and srv.data_dir / "qpq-server.pid" in present
            assert {p.name: oct(_mode(p)) for p in present} == {p.name: "0o600" for p in present}
    finally:
        os.umask(old)


def test_repeated_log_records_are_throttled_then_summarised() -> None:
    now = [0.0]
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("qpq.test.flood")
    logger.propagate = False
    handler = Keep()
    handler.addFilter(RepeatFilter(burst=3, window_s=10.0, clock=lambda: now[0]))
    logger.addHandler(handler)
    try:
        for _ in range(1000):
            logger.error("unexpected error handling request")
        logger.error("a different message")
        assert len(records) == 4
        now[0] = 11.0
        logger.error("unexpected error handling request")
        assert len(records) == 5 and records[-1].suppressed_before == 997
    finally:
        logger.removeHandler(handler)


def test_access_token_on_the_command_line_gets_a_warning(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "QPQ_AUTH_TOKEN"}
    result = subprocess.run(
        [str(BIN / "qpq-client"), "--server", "127.0.0.1:9", "--timeout", "1",
         "--auth-token", "t0ken-on-argv", "--profile", str(tmp_path), "recv", "alice"],
        capture_output=True, text=True, timeout=60, env=env)
    assert "visible to other users" in result.stderr
    assert "t0ken-on-argv" not in result.stderr
    quiet = subprocess.run(
        [str(BIN / "qpq-client"), "--server", "127.0.0.1:9", "--timeout", "1",
         "--profile", str(tmp_path), "recv", "alice"],
        capture_output=True, text=True, timeout=60, env={**env, "QPQ_AUTH_TOKEN": "x"})
    assert "visible to other users" not in quiet.stderr
