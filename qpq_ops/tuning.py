"""Host tuning for QUIC: the recommended sysctl and open-files settings, and checks.

Nothing here changes the host by itself: `render_*` return file contents,
`write_atomic` writes only where it is told, `check_*` only read (`/proc/sys`,
`/proc/PID/limits`, `getrlimit`). Every reader takes a root so tests can point it at a
fake tree.
"""

from __future__ import annotations

import re
import resource
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from qpq_ops.capacity import NOFILE, SYSCTL
from qpq_server import fsutil

__all__ = [
    "LIMITS_D_PATH",
    "SYSCTL_PATH",
    "SYSTEMD_DROPIN_PATH",
    "CheckState",
    "SettingCheck",
    "check_nofile",
    "check_sysctl",
    "read_nofile",
    "render_limits_d",
    "render_sysctl_conf",
    "render_systemd_dropin",
    "write_atomic",
]

SYSCTL_PATH = Path("/etc/sysctl.d/99-qpq.conf")
SYSTEMD_DROPIN_PATH = Path("/etc/systemd/system/qpq-server.service.d/limits.conf")
LIMITS_D_PATH = Path("/etc/security/limits.d/99-qpq.conf")


class CheckState(StrEnum):
    OK = "ok"
    BELOW = "below"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class SettingCheck:
    """One live setting compared with its recommended minimum."""

    name: str
    recommended: int
    live: int | None
    state: CheckState
    fix: str


def render_sysctl_conf(settings: dict[str, int] | None = None) -> str:
    lines = [
        "# qpq: UDP socket buffers for QUIC (scaling guide, Tuning).",
        f"# Written by qpq-ops tune sysctl. Apply: sysctl -p {SYSCTL_PATH}",
    ]
    lines += [f"{key} = {value}" for key, value in (settings or SYSCTL).items()]
    return "\n".join(lines) + "\n"


def render_systemd_dropin(nofile: int = NOFILE) -> str:
    return (
        "# qpq: open-files limit for the server (scaling guide, Tuning).\n"
        f"# Install as {SYSTEMD_DROPIN_PATH}, then:\n"
        "#   systemctl daemon-reload && systemctl restart qpq-server\n"
        f"[Service]\nLimitNOFILE={nofile}\n"
    )


def render_limits_d(user: str = "qpq", nofile: int = NOFILE) -> str:
    return (
        "# qpq: open-files limit for logins of the service user (pam_limits).\n"
        f"# Install as {LIMITS_D_PATH}.\n"
        f"{user} soft nofile {nofile}\n"
        f"{user} hard nofile {nofile}\n"
    )


def write_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    """Write `text` to `path` so readers see the old or the new file, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fsutil.write_atomic(path, text, mode=mode)


def _read_int(path: Path) -> int | None:
    try:
        # Some keys hold several numbers (e.g. tcp_rmem); the first is the one compared.
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def check_sysctl(proc_sys: Path = Path("/proc/sys"),
                 settings: dict[str, int] | None = None) -> list[SettingCheck]:
    """Compare the live values under `proc_sys` with the recommended minimums."""
    checks = []
    for key, want in (settings or SYSCTL).items():
        live = _read_int(proc_sys.joinpath(*key.split(".")))
        if live is None:
            state = CheckState.UNKNOWN
        else:
            state = CheckState.OK if live >= want else CheckState.BELOW
        checks.append(SettingCheck(
            key, want, live, state,
            f"qpq-ops tune sysctl --write {SYSCTL_PATH} && sysctl -p {SYSCTL_PATH}",
        ))
    return checks


_MAX_OPEN_FILES = re.compile(r"^Max open files\s+(\S+)\s+(\S+)", re.M)


def _limit(raw: str) -> int:
    return resource.RLIM_INFINITY if raw == "unlimited" else int(raw)


def read_nofile(pid: int | None = None, proc: Path = Path("/proc")) -> tuple[int, int] | None:
    """(soft, hard) open-files limit of `pid` (from PROC/PID/limits), or of this process."""
    if pid is None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        return soft, hard
    try:
        text = (proc / str(pid) / "limits").read_text()
    except OSError:
        return None
    match = _MAX_OPEN_FILES.search(text)
    if match is None:
        return None
    return _limit(match.group(1)), _limit(match.group(2))


def check_nofile(pid: int | None = None, proc: Path = Path("/proc"),
                 want: int = NOFILE) -> list[SettingCheck]:
    """The soft and hard open-files limits of `pid` (or this process) against `want`."""
    limits = read_nofile(pid, proc)
    who = "this process" if pid is None else f"pid {pid}"
    fix = (f"systemd: qpq-ops tune ulimits --write {SYSTEMD_DROPIN_PATH}; "
           f"shell: ulimit -n {want}")
    checks = []
    for index, kind in enumerate(("soft", "hard")):
        live = None if limits is None else limits[index]
        if live is None:
            state = CheckState.UNKNOWN
        elif live == resource.RLIM_INFINITY or live >= want:
            state = CheckState.OK
        else:
            state = CheckState.BELOW
        checks.append(SettingCheck(f"nofile {kind} ({who})", want, live, state, fix))
    return checks
