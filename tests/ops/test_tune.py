"""tune sysctl / ulimits: print, write atomically, check live values (fake and real)."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qpq_ops.cli import app
from qpq_ops.tuning import nofile_fix
from qpq_server.config import load_config
from tests.helpers.server import running_server

runner = CliRunner()

RECOMMENDED = {
    "net.core.rmem_max": 26214400, "net.core.wmem_max": 26214400,
    "net.core.rmem_default": 1048576, "net.core.wmem_default": 1048576,
}

LIMITS = """Limit                     Soft Limit           Hard Limit           Units
Max cpu time              unlimited            unlimited            seconds
Max open files            {soft:<20} {hard:<20} files
Max locked memory         8388608              8388608              bytes
"""


def fake_proc_sys(root: Path, values: dict[str, int]) -> Path:
    for key, value in values.items():
        path = root.joinpath(*key.split("."))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{value}\n")
    return root


def fake_limits(root: Path, pid: int, soft: str, hard: str) -> Path:
    (root / str(pid)).mkdir(parents=True)
    (root / str(pid) / "limits").write_text(LIMITS.format(soft=soft, hard=hard))
    return root


def test_sysctl_prints_the_guide_settings() -> None:
    result = runner.invoke(app, ["tune", "sysctl"])
    assert result.exit_code == 0
    lines = [ln for ln in result.stdout.splitlines() if ln and not ln.startswith("#")]
    assert lines == [f"{k} = {v}" for k, v in RECOMMENDED.items()]


def test_sysctl_write_is_atomic_and_matches_print(tmp_path: Path) -> None:
    target = tmp_path / "sysctl.d" / "99-qpq.conf"
    target.parent.mkdir()
    target.write_text("old\n")
    result = runner.invoke(app, ["tune", "sysctl", "--write", str(target)])
    assert result.exit_code == 0, result.output
    assert target.read_text() == runner.invoke(app, ["tune", "sysctl"]).stdout
    assert oct(target.stat().st_mode & 0o777) == "0o644"
    assert sorted(p.name for p in target.parent.iterdir()) == ["99-qpq.conf"]
    assert f"wrote {target}" in result.stderr


def test_sysctl_write_to_impossible_path_fails_in_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = runner.invoke(app, ["tune", "sysctl", "--write", str(blocker / "x.conf")])
    assert result.exit_code == 3
    assert result.stderr.count("\n") == 1 and "cannot write" in result.stderr


def test_sysctl_check_passes_when_live_values_meet_the_guide(tmp_path: Path) -> None:
    root = fake_proc_sys(tmp_path, {**RECOMMENDED, "net.core.rmem_max": 33554432})
    result = runner.invoke(app, ["tune", "sysctl", "--check", "--proc-sys", str(root)])
    assert result.exit_code == 0, result.output
    assert "below" not in result.stdout


def test_sysctl_check_exits_1_when_a_value_is_below(tmp_path: Path) -> None:
    root = fake_proc_sys(tmp_path, {**RECOMMENDED, "net.core.wmem_default": 212992})
    result = runner.invoke(app, ["tune", "sysctl", "--check", "--proc-sys", str(root),
                                 "--json"])
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    states = {c["name"]: (c["live"], c["state"]) for c in doc["checks"]}
    assert states["net.core.wmem_default"] == (212992, "below")
    assert states["net.core.rmem_max"] == (26214400, "ok")
    assert doc["settings"] == RECOMMENDED


def test_sysctl_check_exits_3_when_values_cannot_be_read(tmp_path: Path) -> None:
    root = fake_proc_sys(tmp_path, {"net.core.rmem_max": 26214400})
    (tmp_path / "net" / "core" / "wmem_max").write_text("garbage\n")
    result = runner.invoke(app, ["tune", "sysctl", "--check", "--proc-sys", str(root),
                                 "--json"])
    assert result.exit_code == 3
    assert {c["state"] for c in json.loads(result.stdout)["checks"]} == {"ok", "unknown"}


def test_ulimits_prints_dropin_and_limits_d() -> None:
    result = runner.invoke(app, ["tune", "ulimits", "--user", "qpqsvc"])
    assert result.exit_code == 0
    assert "[Service]\nLimitNOFILE=65536\n" in result.stdout
    assert "qpqsvc soft nofile 65536\nqpqsvc hard nofile 65536\n" in result.stdout


def test_ulimits_write_both_files(tmp_path: Path) -> None:
    dropin = tmp_path / "qpq-server.service.d" / "limits.conf"
    limits = tmp_path / "limits.d" / "99-qpq.conf"
    result = runner.invoke(app, ["tune", "ulimits", "--write", str(dropin),
                                 "--write-limits-d", str(limits)])
    assert result.exit_code == 0, result.output
    assert "LimitNOFILE=65536" in dropin.read_text().splitlines()
    assert "qpq hard nofile 65536" in limits.read_text().splitlines()
    assert result.stdout == ""


@pytest.mark.parametrize(("soft", "hard", "code"), [
    ("65536", "65536", 0), ("unlimited", "unlimited", 0), ("1024", "65536", 1),
    ("65536", "4096", 1),
])
def test_ulimits_check_reads_proc_pid_limits(tmp_path: Path, soft: str, hard: str,
                                             code: int) -> None:
    root = fake_limits(tmp_path, 4242, soft, hard)
    result = runner.invoke(app, ["tune", "ulimits", "--check", "--pid", "4242",
                                 "--proc", str(root), "--json"])
    assert result.exit_code == code, result.output
    live = [c["live"] for c in json.loads(result.stdout)["checks"]]
    assert live[:2] == [int(v) if v.isdigit() else v for v in (soft, hard)]


def test_ulimits_check_unknown_pid_exits_3(tmp_path: Path) -> None:
    result = runner.invoke(app, ["tune", "ulimits", "--check", "--pid", "99999999",
                                 "--proc", str(tmp_path)])
    assert result.exit_code == 3


def _lowered() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (512, 1024))


def test_ulimits_check_of_a_real_process_with_low_limits_exits_1() -> None:
    proc = subprocess.Popen(["sleep", "30"], preexec_fn=_lowered)
    try:
        result = runner.invoke(app, ["tune", "ulimits", "--check", "--pid", str(proc.pid),
                                     "--json"])
        assert result.exit_code == 1
        assert [c["live"] for c in json.loads(result.stdout)["checks"]][:2] == [512, 1024]
    finally:
        proc.kill()
        proc.wait(timeout=5)


def test_ulimits_check_of_qpq_ops_itself_uses_its_own_rlimit() -> None:
    out = subprocess.run(
        [sys.executable, "-c", "from qpq_ops.cli import main; main()",
         "tune", "ulimits", "--check", "--self", "--json"],
        preexec_fn=_lowered, capture_output=True, text=True, timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert out.returncode == 1, out.stderr
    checks = json.loads(out.stdout)["checks"]
    assert [c["live"] for c in checks][:2] == [512, 1024]
    assert checks[0]["name"] == "nofile soft (qpq-ops itself, not the server)"


def test_ulimits_check_reads_the_running_server_through_its_config(tmp_path: Path) -> None:
    with running_server(tmp_path) as server:
        pid = int(load_config(server.config_path).pid_path.read_text())
        assert pid == server.process.pid
        result = runner.invoke(app, ["tune", "ulimits", "--check", "--json", "--config",
                                     str(server.config_path)])
        assert result.exit_code in (0, 1), result.output
        doc = json.loads(result.stdout)
        assert doc["pid"] == pid
        assert doc["checks"][0]["name"] == f"nofile soft (server pid {pid})"
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # what the server inherited
        assert [c["live"] for c in doc["checks"]][:2] == [soft, hard]
        by_env = runner.invoke(app, ["tune", "ulimits", "--check", "--json"],
                               env={"QPQ_CONFIG": str(server.config_path)})
        assert json.loads(by_env.stdout)["pid"] == pid


@pytest.mark.parametrize(("args", "code", "message"), [
    ([], 64, "--check needs the running server"),
    (["--pid", "1", "--self"], 64, "--self and --pid name different processes"),
    (["--pid", "1", "--pid-file", "x"], 64, "give one of --pid, --pid-file, --config"),
    (["--pid", "0"], 64, "--pid: must be a positive process id"),
    (["--pid-file", "/nonexistent/qpq.pid"], 3, "is the server running?"),
])
def test_ulimits_check_without_a_clear_target_is_refused(
        monkeypatch: pytest.MonkeyPatch, args: list[str], code: int, message: str) -> None:
    monkeypatch.delenv("QPQ_CONFIG", raising=False)
    result = runner.invoke(app, ["tune", "ulimits", "--check", *args])
    assert result.exit_code == code
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_ulimits_check_compares_with_the_kernel_ceiling_fs_nr_open(tmp_path: Path) -> None:
    root = fake_limits(tmp_path / "proc", 4242, "65536", "65536")
    proc_sys = fake_proc_sys(tmp_path / "sys", {"fs.nr_open": 32768})
    result = runner.invoke(app, ["tune", "ulimits", "--check", "--pid", "4242", "--json",
                                 "--proc", str(root), "--proc-sys", str(proc_sys)])
    assert result.exit_code == 1
    nr_open = json.loads(result.stdout)["checks"][2]
    assert (nr_open["live"], nr_open["state"]) == (32768, "below")
    assert "sysctl -w fs.nr_open=65536" in nr_open["fix"]


def test_nofile_advice_fits_a_non_root_operator_with_a_low_hard_limit() -> None:
    advice = nofile_fix(65536, (1024, 4096), is_root=False)
    assert "only root can raise it" in advice and "ulimit -n 4096" in advice
    assert "ulimit -n 65536" not in advice  # would fail: above the hard limit
    assert "ulimit -n 65536" in nofile_fix(65536, (1024, 1048576), is_root=False)
    assert "systemctl" in nofile_fix(65536, (1024, 4096), is_root=True)


def test_sysctl_write_leaves_an_up_to_date_file_alone_and_says_what_changed(
        tmp_path: Path) -> None:
    target = tmp_path / "99-qpq.conf"
    first = runner.invoke(app, ["tune", "sysctl", "--write", str(target), "--json"])
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout)["changed"] == [str(target)]
    before = target.stat().st_mtime_ns, target.stat().st_ino
    second = runner.invoke(app, ["tune", "sysctl", "--write", str(target), "--json"])
    assert json.loads(second.stdout)["changed"] == []
    assert "up to date" in second.stderr
    assert (target.stat().st_mtime_ns, target.stat().st_ino) == before  # not rewritten
    target.chmod(0o600)  # a wrong mode is a change too
    third = runner.invoke(app, ["tune", "sysctl", "--write", str(target), "--json"])
    assert json.loads(third.stdout)["changed"] == [str(target)]
    assert oct(target.stat().st_mode & 0o777) == "0o644"


def test_dry_run_reports_the_change_and_writes_nothing(tmp_path: Path) -> None:
    dropin, limits = tmp_path / "d" / "limits.conf", tmp_path / "l" / "99-qpq.conf"
    args = ["tune", "ulimits", "--write", str(dropin), "--write-limits-d", str(limits),
            "--json"]
    dry = runner.invoke(app, [*args, "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert json.loads(dry.stdout)["changed"] == [str(dropin), str(limits)]
    assert not dropin.exists() and not limits.exists() and not dropin.parent.exists()
    assert json.loads(runner.invoke(app, args).stdout)["changed"] == [str(dropin), str(limits)]
    assert json.loads(runner.invoke(app, [*args, "--dry-run"]).stdout)["changed"] == []


@pytest.mark.parametrize("command", ["sysctl", "ulimits"])
def test_dry_run_without_a_file_to_write_is_a_usage_error(command: str) -> None:
    result = runner.invoke(app, ["tune", command, "--dry-run"])
    assert result.exit_code == 64
    assert result.stderr.count("\n") == 1 and "--dry-run needs --write" in result.stderr
