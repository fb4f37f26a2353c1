"""`backup list`, `backup prune` (keep-last / keep-daily) and the textfile metric format."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from qpq_ops.backup.catalog import ArchiveInfo, plan_prune
from qpq_ops.backup.manifest import archive_name, parse_archive_name
from qpq_ops.backup.textfile import write_backup_metrics
from tests.backup.support import ops

T0 = dt.datetime(2026, 11, 20, 3, 0, tzinfo=dt.UTC)


def _info(created: dt.datetime) -> ArchiveInfo:
    return ArchiveInfo(Path(archive_name(created, "0.1.0", 2, False)), created, 1, None)


def test_archive_names_carry_time_version_schema_and_secrets() -> None:
    name = archive_name(T0, "0.1.0", 2, True)
    assert name == "qpq-backup-20261120T030000Z-v0.1.0-schema2-with-secrets.tar"
    assert parse_archive_name(name) == T0
    assert parse_archive_name("qpq-backup-x.tar") is None
    assert parse_archive_name(".qpq-backup-123.partial") is None


def test_prune_keeps_the_newest_and_one_per_day() -> None:
    # three backups a day for five days, newest first
    archives = [_info(T0 + dt.timedelta(days=d, hours=h)) for d in range(5) for h in (0, 8, 16)]
    plan = plan_prune(archives, keep_last=2, keep_daily=3)
    kept = sorted(a.created for a in plan.keep)
    newest_day = T0 + dt.timedelta(days=4)
    assert kept == [T0 + dt.timedelta(days=2, hours=16), T0 + dt.timedelta(days=3, hours=16),
                    newest_day + dt.timedelta(hours=8), newest_day + dt.timedelta(hours=16)]
    assert len(plan.delete) == len(archives) - 4


def test_prune_with_fewer_archives_than_asked_keeps_all() -> None:
    archives = [_info(T0)]
    assert plan_prune(archives, keep_last=5, keep_daily=5).delete == ()


def test_prune_cli_deletes_only_old_archives_and_dry_run_deletes_nothing(tmp_path: Path) -> None:
    names = [archive_name(T0 + dt.timedelta(days=d), "0.1.0", 2, False) for d in range(4)]
    for name in names:
        (tmp_path / name).write_bytes(b"")  # unreadable archives still count by name
    (tmp_path / "unrelated.txt").write_text("keep me")
    dry = ops("backup", "prune", tmp_path, "--keep-last", "1",
              "--keep-daily", "1", "--dry-run", "--json")
    assert dry.exit_code == 0 and len(dry.json()["delete"]) == 3
    assert all((tmp_path / n).exists() for n in names)
    real = ops("backup", "prune", tmp_path, "--keep-last", "2", "--keep-daily", "0")
    assert real.exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*names[2:], "unrelated.txt"])
    refused = ops("backup", "prune", tmp_path, "--keep-last", "0", "--keep-daily", "0")
    assert refused.exit_code == 64 and "every backup" in refused.stderr


def test_list_reports_unreadable_archives(tmp_path: Path) -> None:
    (tmp_path / archive_name(T0, "0.1.0", 2, False)).write_bytes(b"not a tar")
    listed = ops("backup", "list", tmp_path, "--json")
    assert listed.exit_code == 0
    [entry] = listed.json()["archives"]
    assert entry["readable"] is False and entry["problem"]
    missing = ops("backup", "list", tmp_path / "absent")
    assert missing.exit_code == 3 and "not a directory" in missing.stderr


def test_textfile_metric_is_valid_exposition_and_replaced_atomically(tmp_path: Path) -> None:
    write_backup_metrics(tmp_path, 1000.0, 10, 1.5)
    path = write_backup_metrics(tmp_path, 2000.0, 20, 2.5)
    values = {f.name: f.samples[0].value
              for f in text_string_to_metric_families(path.read_text())}
    assert values == {"qpq_backup_last_success_timestamp_seconds": 2000.0,
                      "qpq_backup_last_size_bytes": 20.0,
                      "qpq_backup_last_duration_seconds": 2.5}
    assert [p.name for p in tmp_path.iterdir()] == ["qpq_backup.prom"]  # no temp left
