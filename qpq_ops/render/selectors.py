"""Scrape-job names the rules and the dashboard select on.

`prometheus/prometheus.yml` (and any other Prometheus config that scrapes qpq, such as
the Ansible role's) must use these job names, and give a qpq server and the
node_exporter on the same host the same `instance` label, so that host and server
series of one node join on `instance`.
"""

from __future__ import annotations

from qpq_ops.triggers import DEFAULT_SCOPE, RATE_WINDOW

__all__ = ["NODE_JOB", "PROMETHEUS_JOB", "QPQ_JOB", "RATE_WINDOW", "job_matcher"]

QPQ_JOB = DEFAULT_SCOPE.qpq_job
"""Default job names; `qpq-ops render --qpq-job/--node-job` renders others."""
NODE_JOB = DEFAULT_SCOPE.node_job
PROMETHEUS_JOB = "prometheus"


def job_matcher(source: str) -> str:
    """`job="qpq"` (source "qpq") or `job="node"` (source "node") of the current render."""
    from qpq_ops.render.settings import current  # settings imports triggers only

    scope = current().scope
    return f'job="{scope.qpq_job if source == "qpq" else scope.node_job}"'

