"""The node_exporter textfile-collector file that lets Prometheus alert on stale backups."""

from __future__ import annotations

from pathlib import Path

from qpq_server.fsutil import write_atomic

__all__ = ["DEFAULT_TEXTFILE_DIR", "TEXTFILE_NAME", "render_metrics", "write_backup_metrics"]

DEFAULT_TEXTFILE_DIR = Path("/var/lib/prometheus/node-exporter")
TEXTFILE_NAME = "qpq_backup.prom"


def render_metrics(finished_unix: float, size_bytes: int, duration_s: float) -> str:
    return (
        "# HELP qpq_backup_last_success_timestamp_seconds Unix time of the last successful "
        "qpq-ops backup create.\n"
        "# TYPE qpq_backup_last_success_timestamp_seconds gauge\n"
        f"qpq_backup_last_success_timestamp_seconds {finished_unix:.3f}\n"
        "# HELP qpq_backup_last_size_bytes Size of the last successful backup archive.\n"
        "# TYPE qpq_backup_last_size_bytes gauge\n"
        f"qpq_backup_last_size_bytes {size_bytes}\n"
        "# HELP qpq_backup_last_duration_seconds Duration of the last successful backup.\n"
        "# TYPE qpq_backup_last_duration_seconds gauge\n"
        f"qpq_backup_last_duration_seconds {duration_s:.3f}\n"
    )


def write_backup_metrics(directory: Path, finished_unix: float, size_bytes: int,
                         duration_s: float) -> Path:
    """Temp file + rename in the same dir: node_exporter never reads a half-written file
    (its collector skips names not ending in .prom, so the temp name is invisible)."""
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / TEXTFILE_NAME
    write_atomic(target, render_metrics(finished_unix, size_bytes, duration_s), mode=0o644)
    return target
