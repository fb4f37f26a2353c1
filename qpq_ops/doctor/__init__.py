"""`qpq-ops doctor`: one self-check of the host and the deployment, before and after go-live.

`run_doctor(DoctorInputs) -> list[CheckResult]` runs every check of `CHECKS`
concurrently (each bounded by its own timeout) and returns them in `CHECKS` order
(the federation check answers one row per peer).
The deployment comes from the shared `qpq_ops.deployment.load_deployment`.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from qpq_ops.doctor.checks import CHECK_IDS, CHECKS, DoctorInputs
from qpq_ops.doctor.model import CheckResult, CheckState, exit_code_for, worst

__all__ = [
    "CHECKS",
    "CHECK_IDS",
    "CheckResult",
    "CheckState",
    "DoctorInputs",
    "exit_code_for",
    "run_doctor",
    "worst",
]


def run_doctor(inputs: DoctorInputs) -> list[CheckResult]:
    """Every check not in `inputs.skip`, concurrently, in `CHECKS` order."""
    chosen = [check for check_id, check in CHECKS if check_id not in inputs.skip]
    with ThreadPoolExecutor(max_workers=len(CHECKS), thread_name_prefix="doctor") as pool:
        found = list(pool.map(lambda check: check(inputs), chosen))
    # a check of several things (federation: each peer) answers a list
    return [r for item in found for r in (item if isinstance(item, list) else [item])]
