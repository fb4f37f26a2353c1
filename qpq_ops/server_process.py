"""The running qpq server, found through its pid file: is it up, reload it, stop it."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from qpq_ops.errors import OpsError
from qpq_server.config import Config

__all__ = ["ReloadResult", "reload_server", "running_pid", "stop_server"]


def _is_qpq_server(pid: int) -> bool:
    """A live process whose command line is qpq-server (a stale pid may have been reused)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, owned by another user
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc: trust the pid file
    return b"qpq-server" in cmdline or b"qpq_server" in cmdline


def running_pid(config: Config) -> int | None:
    """The pid of the server running on this config's data dir, or None."""
    try:
        pid = int(config.pid_path.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if pid > 0 and _is_qpq_server(pid) else None


@dataclass(frozen=True)
class ReloadResult:
    reloaded: bool
    how: str  # "SIGHUP to pid N", "command: ...", or why nothing was reloaded


def reload_server(config: Config, command: str | None = None) -> ReloadResult:
    """SIGHUP the server via its pid file, or run `command` (say `systemctl reload qpq`)."""
    if command:
        result = subprocess.run(shlex.split(command), capture_output=True, text=True,
                                timeout=60, check=False)
        if result.returncode != 0:
            detail = (result.stderr or result.stdout).strip().splitlines()
            raise OpsError(f"reload command {command!r} failed ({result.returncode}): "
                           f"{detail[-1] if detail else 'no output'}")
        return ReloadResult(True, f"command: {command}")
    pid = running_pid(config)
    if pid is None:
        return ReloadResult(False, "server not running; the change applies at its next start")
    os.kill(pid, signal.SIGHUP)
    time.sleep(0.2)
    if not _is_qpq_server(pid):
        raise OpsError(f"qpq-server (pid {pid}) exited after SIGHUP; check its log")
    return ReloadResult(True, f"SIGHUP to pid {pid}")


def stop_server(config: Config, timeout_s: float = 60.0) -> int | None:
    """SIGTERM the running server (it drains) and wait for it to exit; its pid or None."""
    pid = running_pid(config)
    if pid is None:
        return None
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _is_qpq_server(pid):
            return pid
        time.sleep(0.1)
    raise OpsError(f"qpq-server (pid {pid}) did not stop within {timeout_s:g}s")
