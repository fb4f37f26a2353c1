"""Scrape-job names the rules and the dashboard select on.

`prometheus/prometheus.yml` (and any other Prometheus config that scrapes qpq, such as
the Ansible role's) must use these job names, and give a qpq server and the
node_exporter on the same host the same `instance` label, so that host and server
series of one node join on `instance`.
"""

from __future__ import annotations

__all__ = ["NODE_JOB", "PROMETHEUS_JOB", "QPQ_JOB", "RATE_WINDOW"]

QPQ_JOB = "qpq"
NODE_JOB = "node"
PROMETHEUS_JOB = "prometheus"

RATE_WINDOW = "5m"
"""Range of the recorded rates and quantiles (at least 4 scrape intervals of 15 s)."""
