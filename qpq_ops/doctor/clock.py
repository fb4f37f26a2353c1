"""How far off is this host's clock, where the host can tell.

`chronyc` (when installed) reports the measured offset from NTP; otherwise the kernel's
`adjtimex(2)` says whether an NTP daemon disciplines the clock and its error estimate.
Neither changes anything (adjtimex is called with modes = 0: read only).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import shutil
import subprocess
from dataclasses import dataclass

__all__ = ["ClockReading", "read_clock"]

_TIME_ERROR = 5
_STA_UNSYNC = 0x0040
_STA_NANO = 0x2000


@dataclass(frozen=True)
class ClockReading:
    source: str
    """"chronyc" or "adjtimex\""""
    synchronised: bool
    offset_s: float | None
    """measured (chronyc) or estimated (kernel maxerror) offset"""


class _Timex(ctypes.Structure):
    # The leading fields of struct timex; the tail is padding so the kernel can write it.
    _fields_ = [
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long),
        ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long),
        ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        ("_rest", ctypes.c_byte * 256),
    ]


def _chronyc() -> ClockReading | None:
    binary = shutil.which("chronyc")
    if binary is None:
        return None
    try:
        out = subprocess.run([binary, "-c", "tracking"], capture_output=True, text=True,
                             timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    fields = out.stdout.strip().split(",")
    if out.returncode != 0 or len(fields) < 5:
        return None
    try:
        offset = abs(float(fields[4]))
    except ValueError:
        return None
    return ClockReading("chronyc", fields[1] not in ("", "0.0.0.0"), offset)


def _adjtimex() -> ClockReading | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        timex = _Timex()
        state = int(libc.adjtimex(ctypes.byref(timex)))
    except (OSError, AttributeError):
        return None
    if state < 0:
        return None
    unsynced = state == _TIME_ERROR or bool(timex.status & _STA_UNSYNC)
    if unsynced:
        return ClockReading("adjtimex", False, None)
    # offset is in microseconds, or nanoseconds with STA_NANO
    scale = 1e-9 if timex.status & _STA_NANO else 1e-6
    return ClockReading("adjtimex", True, abs(timex.offset) * scale)


def read_clock() -> ClockReading | None:
    """The best reading this host offers, or None when it cannot tell."""
    return _chronyc() or _adjtimex()
