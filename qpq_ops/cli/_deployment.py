"""The deployment a command's `--config` names, or its one-line error and exit code."""

from __future__ import annotations

from pathlib import Path

from qpq_ops._console import fail
from qpq_ops.deployment import Deployment, load_deployment
from qpq_ops.errors import OpsError

__all__ = ["deployment_or_fail"]


def deployment_or_fail(config: Path) -> Deployment:
    try:
        return load_deployment(config)
    except OpsError as exc:
        fail(str(exc), exc.exit_code)
