"""Evaluate the scaling triggers against a Prometheus or a directly scraped /metrics page.

- `evaluate_prometheus(url, ...)`: PromQL, every query concurrent under one deadline,
  sustain windows honoured, one result per (trigger, instance) for every `up` target
  of the scope's jobs.
- `evaluate_direct(metrics_url, ...)`: two scrapes `sample_s` apart; a sustained trigger
  beyond a threshold is no-data ("not sustained yet"); host triggers without
  node_exporter are listed once in `Evaluation.skipped`.
In both, an optional trigger (federation) without any series does not apply: it is
listed in `Evaluation.skipped` with its reason, never as a no-data row.
Both return an `Evaluation` (results, worst `status`, DESIGN.md `exit_code`, `to_json()`)
or raise `qpq_ops.errors.SourceError` with a one-line message.
"""

from qpq_ops.evaluate.direct import evaluate_direct
from qpq_ops.evaluate.model import Evaluation, TriggerResult, exit_code_for
from qpq_ops.evaluate.prometheus import evaluate_prometheus

__all__ = [
    "Evaluation",
    "TriggerResult",
    "evaluate_direct",
    "evaluate_prometheus",
    "exit_code_for",
]
