"""The `--calibration FILE` option every planning command shares, and how it is read."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from qpq_ops._console import fail
from qpq_ops.calibration import REFERENCE, Calibration
from qpq_ops.calibration import load as load_calibration
from qpq_ops.errors import CalibrationError

__all__ = ["CalibrationOpt", "calibration_or_fail"]

CalibrationOpt = Annotated[Path | None, typer.Option(
    "--calibration", metavar="FILE",
    help="qpq's measured costs from `qpq-ops capacity calibrate --out FILE`. Default: the "
    "shipped reference calibration (docs/operations/scaling-guide.md).")]


def calibration_or_fail(path: Path | None) -> Calibration:
    """The calibration in `path` (the shipped reference when None); a usage error (64)
    naming the option when the file cannot be read."""
    try:
        return REFERENCE if path is None else load_calibration(path)
    except CalibrationError as exc:
        fail(f"--calibration: {exc}")
