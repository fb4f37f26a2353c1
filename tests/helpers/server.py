"""The test-side names of the one process launcher, `qpq_server.devserver` (re-exported)."""

from __future__ import annotations

from qpq_server.devserver import (
    BIN,
    RunningServer,
    await_until,
    init_server_dir,
    rss_kb,
    running_server,
    start_server,
    wait_until,
)
from qpq_server.secrets import read_env_file

init_data_dir = init_server_dir  # the name tests used before the launcher moved

__all__ = ["BIN", "RunningServer", "await_until", "init_data_dir", "init_server_dir",
           "read_env_file", "rss_kb", "running_server", "start_server", "wait_until"]
