"""Warn when an environment variable would override a value rotated in the `.env` file.

The server reads secrets from its environment first and the `.env` second, so a
rotation that rewrites `.env` does nothing while the variable is also set in the
server's environment (a systemd `Environment=` line, say).
"""

from __future__ import annotations

import os
from pathlib import Path

from qpq_ops.server_process import running_pid
from qpq_server.config import Config

__all__ = ["override_warnings"]


def _process_env_names(pid: int) -> set[str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return set()
    return {item.split(b"=", 1)[0].decode(errors="replace") for item in raw.split(b"\0") if item}


def override_warnings(config: Config, name: str) -> list[str]:
    warnings = []
    if os.environ.get(name):
        warnings.append(f"{name} is set in this shell's environment; the server reads the "
                        "environment before .env, so make sure its own environment does not "
                        "set it")
    pid = running_pid(config)
    if pid is not None and name in _process_env_names(pid):
        warnings.append(f"the running qpq-server (pid {pid}) has {name} in its environment, "
                        "which overrides .env: change it at its source (a systemd unit?) too")
    return warnings
