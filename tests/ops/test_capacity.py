"""capacity plan: the guide's worksheet checked against hand-computed figures."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qpq_ops.calibration import (
    POSTGRES_REFERENCE,
    REFERENCE,
    Calibration,
    PostgresCost,
    dump,
)
from qpq_ops.capacity import (
    BEYOND_ONE_NODE,
    NR_OPEN_DEFAULT,
    CapacityInputs,
    plan,
    postgres_sizing,
)
from qpq_ops.cli import app
from qpq_ops.errors import CalibrationError, CapacityInputError

runner = CliRunner()

GUIDE_SYSCTL = {
    "net.core.rmem_max": 26214400, "net.core.wmem_max": 26214400,
    "net.core.rmem_default": 1048576, "net.core.wmem_default": 1048576,
}


def _args(**kw: object) -> list[str]:
    args = ["capacity", "plan"]
    for key, value in kw.items():
        args += ["--" + key.replace("_", "-"), str(value)]
    return args


TEN_K = dict(users=10_000, msgs_per_user_hour=10, avg_msg_bytes=1500,
             blob_uploads_per_day=1000, avg_blob_mb=2, retention_days=90)


def test_guide_example_ten_thousand_connections() -> None:
    p = plan(CapacityInputs(**TEN_K))
    # 10,000 x 5 KB + 256 MB base = 50 MB + 256 MB
    assert p.memory_bytes == 306_000_000
    # the guide's per-item model: 50 MB + ~5 MB + 50 MB + 30 MB ~= 135 MB
    assert p.memory_model.connections_bytes == 50_000_000
    assert p.memory_model.storage_pool_bytes == 50_000_000
    assert p.memory_model.base_process_bytes == 30_000_000
    assert abs(p.memory_model.total_bytes - 135_000_000) <= 1_000_000
    # "so 256-512 MB minimum"
    assert 256_000_000 <= p.memory_bytes <= 512_000_000
    assert p.memory_bytes >= p.memory_model.total_bytes
    # 10,000 x 10 x 24 x 1500 B + 1000 x 2 MB
    assert p.message_bytes_per_day == 3_600_000_000
    assert p.blob_bytes_per_day == 2_000_000_000
    assert p.storage_per_day_bytes == 5_600_000_000
    assert p.db_growth_per_month_bytes == 168_000_000_000
    assert p.retained_bytes == 504_000_000_000
    assert p.retention_storage_bytes == 720_000_000_000  # / 0.70
    assert p.vcpus == 4  # 1 vCPU per 2,500 connections
    assert p.tier == "Large"  # "~10,000+ concurrent users"
    assert (p.host_vcpus, p.host_memory_bytes, p.host_disk_bytes) == (8, 8e9, 720e9)
    assert p.nofile == 65536
    assert p.sysctl == GUIDE_SYSCTL


def test_small_team_fits_minimum_tier() -> None:
    p = plan(CapacityInputs(users=50, msgs_per_user_hour=20, avg_msg_bytes=1000,
                            blob_uploads_per_day=10, avg_blob_mb=1, retention_days=30))
    assert p.storage_per_day_bytes == 24_000_000 + 10_000_000
    assert p.db_growth_per_month_bytes == 1_020_000_000
    assert p.retention_storage_bytes == 1_457_142_858  # ceil(1.02e9 / 0.7)
    assert p.memory_bytes == 256_250_000
    assert p.vcpus == 1
    assert p.tier == "Minimum"
    assert (p.host_vcpus, p.host_memory_bytes, p.host_disk_bytes) == (1, 512e6, 10e9)


def test_peak_factor_scales_load_but_not_daily_storage() -> None:
    p = plan(CapacityInputs(users=2000, msgs_per_user_hour=10, avg_msg_bytes=1000,
                            blob_uploads_per_day=100, avg_blob_mb=1, retention_days=30,
                            peak_factor=1.5))
    assert p.peak_users == 3000
    assert p.storage_per_day_bytes == 480_000_000 + 100_000_000
    assert p.db_growth_per_month_bytes == 17_400_000_000
    assert p.retention_storage_bytes == 24_857_142_858
    assert p.memory_bytes == 3000 * 5000 + 256_000_000
    assert p.vcpus == 2
    assert p.tier == "Recommended"
    assert (p.host_vcpus, p.host_memory_bytes, p.host_disk_bytes) == (2, 2e9, 50e9)


def test_retention_storage_beyond_recommended_disk_picks_large() -> None:
    p = plan(CapacityInputs(users=2000, msgs_per_user_hour=30, avg_msg_bytes=2000,
                            blob_uploads_per_day=500, avg_blob_mb=5, retention_days=60,
                            peak_factor=1.5))
    assert p.storage_per_day_bytes == 2_880_000_000 + 2_500_000_000
    assert p.retention_storage_bytes == 461_142_857_143
    assert p.vcpus == 2
    assert p.tier == "Large"
    assert p.host_disk_bytes == 500_000_000_000


def test_message_rate_can_drive_the_cpu_estimate() -> None:
    p = plan(CapacityInputs(users=1000, msgs_per_user_hour=3600, avg_msg_bytes=100,
                            blob_uploads_per_day=0, avg_blob_mb=0, retention_days=1))
    assert p.vcpus_for_connections == 1
    assert p.vcpus_for_messages == 2  # 1,000 msg/s x 2 requests / 1,000 per vCPU
    assert p.vcpus == 2
    assert p.storage_per_day_bytes == 8_640_000_000
    assert p.retention_storage_bytes == 12_342_857_143
    assert p.tier == "Recommended"


def test_one_hundred_thousand_users_is_beyond_one_node() -> None:
    p = plan(CapacityInputs(users=100_000, msgs_per_user_hour=10, avg_msg_bytes=1000,
                            blob_uploads_per_day=0, avg_blob_mb=0, retention_days=30))
    assert p.vcpus == 40
    assert p.tier == BEYOND_ONE_NODE
    assert p.memory_bytes == 756_000_000
    assert p.nofile == 262_144  # 2 per peak user, power of two


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"users": 0}, "users: must be greater than 0"),
        ({"users": -5}, "users: must be greater than 0"),
        ({"users": 10.5}, "users: must be a whole number"),
        ({"retention_days": 0}, "retention_days: must be greater than 0"),
        ({"avg_msg_bytes": 0}, "avg_msg_bytes: must be greater than 0"),
        ({"msgs_per_user_hour": -1}, "msgs_per_user_hour: must be 0 or more"),
        ({"avg_blob_mb": float("nan")}, "avg_blob_mb: must be finite"),
        ({"peak_factor": 0.5}, "peak_factor: must be 1 or more"),
        ({"blob_uploads_per_day": "3"}, "blob_uploads_per_day: must be a number"),
    ],
)
def test_invalid_inputs_are_refused(change: dict[str, object], message: str) -> None:
    with pytest.raises(CapacityInputError, match=message):
        CapacityInputs(**{**TEN_K, **change})  # type: ignore[arg-type]


GUIDE_KEYS = {
    "inputs", "peak_users", "message_bytes_per_day", "blob_bytes_per_day",
    "storage_per_day_bytes", "db_growth_per_month_bytes", "retained_bytes",
    "retention_storage_bytes", "disk_headroom_fill_ratio", "memory_bytes", "memory_model",
    "peak_messages_per_s", "vcpus_for_connections", "vcpus_for_messages", "vcpus", "tier",
    "nofile", "sysctl", "host", "input_sources",
}


def test_cli_json_gives_every_figure_and_echoes_inputs() -> None:
    result = runner.invoke(app, [*_args(**TEN_K), "--model", "guide", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["inputs"] == {"users": 10000, "msgs_per_user_hour": 10.0,
                             "avg_msg_bytes": 1500.0, "blob_uploads_per_day": 1000.0,
                             "avg_blob_mb": 2.0, "retention_days": 90, "peak_factor": 1.0}
    assert doc["storage_per_day_bytes"] == 5_600_000_000
    assert doc["db_growth_per_month_bytes"] == 168_000_000_000
    assert doc["retention_storage_bytes"] == 720_000_000_000
    assert doc["memory_bytes"] == 306_000_000
    assert doc["vcpus"] == 4
    assert doc["tier"] == "Large"
    assert doc["nofile"] == 65536
    assert doc["sysctl"] == GUIDE_SYSCTL
    assert doc["host"] == {"vcpus": 8, "memory_bytes": 8_000_000_000,
                           "disk_bytes": 720_000_000_000}
    assert doc["input_sources"]["users"] == "option"
    assert set(doc) == GUIDE_KEYS  # the worksheet's JSON, unchanged


def test_cli_table_names_tier_and_settings() -> None:
    result = runner.invoke(app, [*_args(**TEN_K), "--model", "guide"])
    assert result.exit_code == 0, result.output
    for text in ("storage per day", "5.60 GB", "306.00 MB", "Tier: Large",
                 "net.core.rmem_max = 26214400", "LimitNOFILE=65536"):
        assert text in result.stdout


def _calibration(**change: object) -> Calibration:
    base = dict(rss_base_bytes=60_000_000, rss_per_connection_bytes=70_000,
                cpu_s_per_enqueue=0.0005, cpu_s_per_fetch=0.0003, cpu_s_per_ack=0.0002,
                cpu_s_per_handshake=0.004, cpu_s_per_login=0.006,
                durable_commits_per_s=400.0, machine={"cpu": "test"})
    return Calibration(**{**base, **change})  # type: ignore[arg-type]


def test_measured_model_sizes_from_qpq_costs() -> None:
    # 10,000 users x 10 msg/h = 27.8 msg/s x 1 ms of CPU each = 0.028 cores: one worker;
    # memory 1 x 60 MB + 10,000 x 70 KB = 760 MB (the guide says 306 MB)
    result = plan(CapacityInputs(**TEN_K), _calibration())  # type: ignore[arg-type]
    m = result.measured
    assert m is not None
    assert m.memory_bytes == 760_000_000 == result.memory_bytes
    assert m.cpu_cores == pytest.approx(10_000 * 10 / 3600 * 0.001)
    assert m.workers == 1 == result.vcpus and m.hosts == 1
    assert m.reconnect_storm_s == pytest.approx(10_000 * 0.010)
    assert m.commits_needed_per_s == pytest.approx(2 * 10_000 * 10 / 3600)
    # a busy deployment: 200,000 users x 60 msg/h = 3,333 msg/s x 1 ms = 3.3 cores
    # -> 5 workers under the 80 % process_cpu warning; 2 hosts of 4 cores
    busy = CapacityInputs(**{**TEN_K, "users": 200_000, "msgs_per_user_hour": 60})  # type: ignore[arg-type]
    m = plan(busy, _calibration(), cores_per_host=4).measured
    assert m is not None and (m.workers, m.hosts) == (5, 2)


def test_cli_measured_json_keeps_the_guide_keys_and_adds_both_models(tmp_path: Path) -> None:
    path = tmp_path / "calibration.json"
    path.write_text(dump(_calibration()))
    result = runner.invoke(app, [*_args(**TEN_K), "--calibration", str(path), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert set(doc) > GUIDE_KEYS
    assert doc["model"] == "measured" and doc["memory_bytes"] == 760_000_000
    assert doc["measured"]["workers"] == 1
    assert doc["guide"] == {"memory_bytes": 306_000_000, "vcpus": 4, "tier": "Large"}
    table = runner.invoke(app, [*_args(**TEN_K), "--calibration", str(path)],
                          env={"COLUMNS": "160"})
    for text in ("qpq measured", "guide", "760.00 MB", "306.00 MB", "reconnect storm"):
        assert text in table.stdout, text


def test_default_model_is_the_shipped_reference_calibration() -> None:
    doc = json.loads(runner.invoke(app, [*_args(**TEN_K), "--json"]).stdout)
    assert doc["model"] == "measured"
    assert doc["measured"]["calibration_machine"] == REFERENCE.machine
    assert doc["memory_bytes"] == (REFERENCE.rss_base_bytes * doc["measured"]["workers"]
                                   + 10_000 * REFERENCE.rss_per_connection_bytes)


@pytest.mark.parametrize(("text", "message"), [
    ("{", "is not JSON"), ("[]", "must hold a JSON object"),
    ('{"rss_base_bytes": 1}', "missing"),
])
def test_bad_calibration_file_exits_64(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "c.json"
    path.write_text(text)
    result = runner.invoke(app, [*_args(**TEN_K), "--calibration", str(path)])
    assert result.exit_code == 64 and message in result.stderr


def test_calibration_with_guide_model_is_a_usage_error(tmp_path: Path) -> None:
    result = runner.invoke(app, [*_args(**TEN_K), "--model", "guide", "--calibration", "x"])
    assert result.exit_code == 64


@pytest.mark.parametrize(("option", "value"), [
    ("users", "1e23"), ("msgs_per_user_hour", "1e9"), ("avg_msg_bytes", "1e12"),
    ("retention_days", "100000"), ("peak_factor", "1000"),
])
def test_implausible_inputs_exit_64(option: str, value: str) -> None:
    result = runner.invoke(app, _args(**{**TEN_K, option: value}))
    assert result.exit_code == 64, result.output
    assert "must be at most" in result.stderr


def test_nofile_above_the_kernel_ceiling_says_how_to_raise_it() -> None:
    big = plan(CapacityInputs(**{**TEN_K, "users": 1_000_000}))  # type: ignore[arg-type]
    assert big.nofile > NR_OPEN_DEFAULT
    assert big.sysctl["fs.nr_open"] == big.nofile
    small = plan(CapacityInputs(**TEN_K))  # type: ignore[arg-type]
    assert "fs.nr_open" not in small.sysctl
    result = runner.invoke(app, _args(**{**TEN_K, "users": 1_000_000}),
                           env={"COLUMNS": "200"})
    assert f"fs.nr_open = {big.nofile}" in result.stdout
    assert "above Linux's default fs.nr_open" in result.stdout


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("users", "abc", "--users: expected a number, got 'abc'"),
        ("users", "12.5", "--users: expected a whole number"),
        ("users", "-3", "--users: must be greater than 0"),
        ("retention_days", "0", "--retention-days: must be greater than 0"),
        ("avg_blob_mb", "inf", "--avg-blob-mb: expected a finite number"),
        ("peak_factor", "0.2", "--peak-factor: must be 1 or more"),
        ("msgs_per_user_hour", "ten", "--msgs-per-user-hour: expected a number"),
    ],
)
def test_cli_bad_input_exits_64_with_one_line(option: str, value: str, message: str) -> None:
    result = runner.invoke(app, _args(**{**TEN_K, option: value}))
    assert result.exit_code == 64
    assert message in result.stderr
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1


def test_cli_missing_inputs_exit_64() -> None:
    result = runner.invoke(app, _args(users=10))
    assert result.exit_code == 64
    assert "missing input(s): --msgs-per-user-hour" in result.stderr


def test_from_file_yaml_with_option_override(tmp_path: Path) -> None:
    path = tmp_path / "plan.yaml"
    path.write_text("users: 50\nmsgs-per-user-hour: 20\navg_msg_bytes: 1000\n"
                    "blob_uploads_per_day: 10\navg_blob_mb: 1\nretention_days: 30\n")
    result = runner.invoke(app, ["capacity", "plan", "--from-file", str(path), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["tier"] == "Minimum"
    result = runner.invoke(app, ["capacity", "plan", "--from-file", str(path),
                                 "--users", "10000", "--json"])
    doc = json.loads(result.stdout)
    assert doc["inputs"]["users"] == 10000
    assert doc["input_sources"] == {"users": "option", "msgs_per_user_hour": "file",
                                    "avg_msg_bytes": "file", "blob_uploads_per_day": "file",
                                    "avg_blob_mb": "file", "retention_days": "file"}


def test_from_file_toml_capacity_table(tmp_path: Path) -> None:
    path = tmp_path / "plan.toml"
    path.write_text("[capacity]\nusers = 10000\nmsgs_per_user_hour = 10\n"
                    "avg_msg_bytes = 1500\nblob_uploads_per_day = 1000\navg_blob_mb = 2\n"
                    "retention_days = 90\n")
    result = runner.invoke(app, ["capacity", "plan", "--from-file", str(path), "--model",
                                 "guide", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["memory_bytes"] == 306_000_000


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("bad.yaml", "users: [1,\n", "is not valid .yaml"),
        ("list.yaml", "- 1\n- 2\n", "must hold a mapping"),
        ("unknown.yaml", "users: 5\nseats: 3\n", "unknown input 'seats'"),
        ("bad.toml", "users = \n", "is not valid .toml"),
        ("text.yaml", "users: many\nmsgs_per_user_hour: 1\navg_msg_bytes: 1\n"
         "blob_uploads_per_day: 1\navg_blob_mb: 1\nretention_days: 1\n",
         "--users: expected a number, got 'many'"),
    ],
)
def test_from_file_bad_content_exits_64(tmp_path: Path, name: str, text: str,
                                        message: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    result = runner.invoke(app, ["capacity", "plan", "--from-file", str(path)])
    assert result.exit_code == 64, result.output
    assert message in result.stderr


def test_from_file_missing_exits_64(tmp_path: Path) -> None:
    result = runner.invoke(app, ["capacity", "plan", "--from-file", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 64
    assert "cannot read" in result.stderr


def test_from_prometheus_unreachable_exits_3() -> None:
    from tests.helpers.ports import free_port

    url = f"http://127.0.0.1:{free_port()}"
    result = runner.invoke(app, [*_args(avg_msg_bytes=1000, blob_uploads_per_day=0,
                                        avg_blob_mb=0, retention_days=30),
                                 "--from-prometheus", url, "--timeout", "2"])
    assert result.exit_code == 3
    assert f"cannot reach Prometheus at {url}" in result.stderr


def test_measured_model_recommends_workers_per_host_and_a_postgres_beyond_one_host() -> None:
    # one host suffices: sqlcipher, every worker on it, no PostgreSQL
    small = plan(CapacityInputs(**TEN_K), _calibration())  # type: ignore[arg-type]
    assert small.measured is not None
    assert (small.measured.storage_backend, small.measured.workers_per_host) == ("sqlcipher", 1)
    assert small.measured.postgres is None
    # 200,000 users x 60 msg/h x 2.5 peak = 8,333 msg/s x 1 ms = 8.3 cores -> 11 workers
    # on hosts of 4 cores: 3 hosts x 4 workers on one PostgreSQL
    busy = CapacityInputs(**{**TEN_K, "users": 200_000, "msgs_per_user_hour": 60,  # type: ignore[arg-type]
                             "peak_factor": 2.5, "avg_msg_bytes": 2_000})
    m = plan(busy, _calibration(), cores_per_host=4).measured
    assert m is not None and (m.workers, m.hosts, m.workers_per_host) == (11, 3, 4)
    assert m.storage_backend == "postgres" and m.postgres is not None
    peak = 200_000 * 60 / 3600 * 2.5
    assert m.postgres.commits_per_s == pytest.approx(2 * peak)
    # sized from PostgreSQL's measured CPU per message, kept under the cpu warning (70 %)
    pg_cpu = peak * POSTGRES_REFERENCE.cpu_s_per_message
    assert m.postgres.cpu_cores == pytest.approx(pg_cpu)
    assert m.postgres.vcpus == max(2, math.ceil(pg_cpu / 0.70))
    assert m.postgres.cpu_s_per_message == POSTGRES_REFERENCE.cpu_s_per_message
    assert "bench/scale.py" in m.postgres.measured_by
    assert m.postgres.connections == 3 * 4 * (4 + 1) + 10
    assert m.postgres.max_connections == math.ceil(m.postgres.connections * 1.25)
    assert m.postgres.memory_bytes == max(4 * 10**9, math.ceil(8 * peak * 2_000 * 900))
    result = plan(busy, _calibration(), cores_per_host=4)
    assert m.postgres.disk_bytes == result.retention_storage_bytes + 2 * 10**9


def test_one_host_whose_commits_outrun_sqlcipher_is_sent_to_postgres() -> None:
    # 0.3 cores of CPU (one host) but 2 x 83 msg/s = 167 commits/s > 100 measured
    inputs = CapacityInputs(**{**TEN_K, "users": 30_000})  # type: ignore[arg-type]
    m = plan(inputs, _calibration(durable_commits_per_s=100.0)).measured
    assert m is not None and m.hosts == 1 and m.storage_backend == "postgres"
    assert m.postgres is not None and m.postgres.connections == 1 * m.workers * 5 + 10


def test_cli_json_adds_the_postgres_keys_and_the_table_names_them(tmp_path: Path) -> None:
    path = tmp_path / "calibration.json"
    path.write_text(dump(_calibration()))
    args = [*_args(**{**TEN_K, "users": 200_000, "msgs_per_user_hour": 60}),
            "--calibration", str(path), "--cores-per-host", "2"]
    doc = json.loads(runner.invoke(app, [*args, "--json"]).stdout)
    assert set(doc) > GUIDE_KEYS
    measured = doc["measured"]
    assert measured["storage_backend"] == "postgres" and measured["workers_per_host"] == 2
    assert set(measured["postgres"]) == {"vcpus", "memory_bytes", "disk_bytes", "connections",
                                         "max_connections", "commits_per_s", "cpu_cores",
                                         "cpu_s_per_message", "measured_by"}
    table = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert table.exit_code == 0, table.output
    for text in ("workers per host", "PostgreSQL max_connections", 'backend = "postgres"',
                 "ms PostgreSQL CPU per message (measured: bench/scale.py"):
        assert text in table.stdout, text


def test_postgres_vcpus_follow_the_measured_cpu_per_message() -> None:
    busy = CapacityInputs(**{**TEN_K, "users": 200_000, "msgs_per_user_hour": 60,  # type: ignore[arg-type]
                             "peak_factor": 2.5})
    m = plan(busy, _calibration(), cores_per_host=4).measured
    assert m is not None
    peak = m.commits_needed_per_s / 2
    costly = PostgresCost(cpu_s_per_message=0.01, source="test")
    sized = postgres_sizing(m, 1.0, 0, costly)
    assert sized.vcpus == math.ceil(peak * 0.01 / 0.70) and sized.measured_by == "test"
    # a tiny cost still gets the floor
    assert postgres_sizing(m, 1.0, 0, PostgresCost(1e-9, "test")).vcpus == 2


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_a_postgres_cost_must_be_a_positive_number(bad: float) -> None:
    with pytest.raises(CalibrationError, match="cpu_s_per_message must be a positive number"):
        PostgresCost(bad, "test")
