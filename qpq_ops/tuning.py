"""Host tuning for QUIC: the recommended sysctl and open-files settings, and checks.

Nothing here changes the host by itself: `render_*` return file contents,
`write_atomic` writes only where it is told, `check_*` only read (`/proc/sys`,
`/proc/PID/limits`, `getrlimit`). Every reader takes a root so tests can point it at a
fake tree.
"""

from __future__ import annotations

import os
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
    "nofile_fix",
    "read_nofile",
    "read_nr_open",
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


def read_nr_open(proc_sys: Path = Path("/proc/sys")) -> int | None:
    """The kernel's ceiling for any process's open-files limit (fs.nr_open)."""
    return _read_int(proc_sys / "fs" / "nr_open")


def nofile_fix(want: int, limits: tuple[int, int] | None, is_root: bool) -> str:
    """What to do so the server gets `want` open files, for the operator at hand.

    A non-root user can raise the soft limit only up to the hard one; past that it takes
    root (a systemd drop-in for the service, or limits.d for logins).
    """
    root_way = (f"as root: qpq-ops tune ulimits --write {SYSTEMD_DROPIN_PATH} && "
                "systemctl daemon-reload && systemctl restart qpq-server")
    if limits is None:
        return root_way
    hard = limits[1]
    if hard != resource.RLIM_INFINITY and hard < want:
        if is_root:
            return root_way
        return (f"the hard limit {hard} is below {want} and only root can raise it: ask "
                f"for `qpq-ops tune ulimits --write {SYSTEMD_DROPIN_PATH}` (service) or "
                f"`--write-limits-d {LIMITS_D_PATH}` (logins); until then start the server "
                f"after `ulimit -n {hard}`")
    return (f"in the shell that starts the server: ulimit -n {want} (your hard limit "
            f"allows it); for the service: {root_way}")


def check_nofile(pid: int | None = None, proc: Path = Path("/proc"),
                 want: int = NOFILE, who: str | None = None,
                 proc_sys: Path = Path("/proc/sys")) -> list[SettingCheck]:
    """The soft and hard open-files limits of `pid` (or this process) against `want`,
    and the kernel's fs.nr_open, which caps both."""
    limits = read_nofile(pid, proc)
    who = who or ("this process" if pid is None else f"pid {pid}")
    fix = nofile_fix(want, limits, os.geteuid() == 0)
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
    nr_open = read_nr_open(proc_sys)
    checks.append(SettingCheck(
        "fs.nr_open (kernel ceiling)", want, nr_open,
        CheckState.UNKNOWN if nr_open is None else (
            CheckState.OK if nr_open >= want else CheckState.BELOW),
        f"as root: sysctl -w fs.nr_open={want} and add `fs.nr_open = {want}` to "
        f"{SYSCTL_PATH}; no limit can exceed it"))
    return checks
