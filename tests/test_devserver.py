"""The one process launcher, qpq_server.devserver, used by tests, bench/ and the demo."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qpq_server.devserver import (
    await_until,
    init_server_dir,
    running_server,
    start_server,
    stop_process,
    wait_until,
)


def test_importing_the_launcher_loads_no_quic_or_websocket_stack() -> None:
    code = ("import sys, qpq_server.devserver; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('aioquic', 'websockets')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.strip() == "[]"


def test_wait_until_returns_the_truthy_value_and_names_what_timed_out() -> None:
    started = time.monotonic()
    assert wait_until(lambda: time.monotonic() - started > 0.1 and "done", 5, "clock") == "done"
    with pytest.raises(TimeoutError, match=r"the flag: not true within 0.2s \(last: 0\)"):
        wait_until(lambda: 0, 0.2, "the flag")


async def test_await_until_takes_sync_and_async_predicates() -> None:
    calls: list[int] = []

    async def grows() -> int:
        calls.append(1)
        return len(calls) >= 3 and len(calls)

    assert await await_until(grows, 5, "three calls") == 3
    with pytest.raises(TimeoutError, match="never"):
        await await_until(lambda: None, 0.1, "never")


def test_stop_process_kills_what_ignores_term() -> None:
    proc = subprocess.Popen([sys.executable, "-c",
                             "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
                             " print('up', flush=True); time.sleep(60)"],
                            stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"up\n"
    assert stop_process(proc, timeout=0.5) == -signal.SIGKILL


def test_a_server_that_cannot_start_fails_fast_with_its_log(tmp_path: Path) -> None:
    config_path = init_server_dir(tmp_path / "data", {"storage": {"backend": "no-such"}})
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="qpq-server exited"):
        start_server(config_path, ready_timeout=20)
    assert time.monotonic() - started < 15


async def test_connect_fills_in_token_and_ca(tmp_path: Path) -> None:
    with running_server(tmp_path) as srv:
        async with srv.connect() as conn:
            assert (await conn.call("ping"))["ok"]
        assert srv.metric("qpq_connections_active") >= 0
    assert srv.process.returncode == 0


def test_reload_returns_once_the_server_logged_it_and_a_failed_one_raises(
        tmp_path: Path) -> None:
    with running_server(tmp_path) as srv:
        done, failed = srv.reloads()
        srv.reload()
        assert srv.reloads() == (done + 1, failed)
        (srv.data_dir / ".env").write_text("QPQ_DB_KEY=only-this\n")  # no access token
        with pytest.raises(RuntimeError, match="reload failed"):
            srv.reload()
        assert srv.process.poll() is None  # the server kept its previous tokens
