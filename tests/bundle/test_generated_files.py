"""Generated files: committed copies equal a fresh render, and `render --check` says so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qpq_ops.cli import app
from qpq_ops.exit_codes import ExitCode
from qpq_ops.render import HEADER, Artefact, render, write_files

ALL_FILES = render(Artefact.ALL)


@pytest.mark.parametrize("rendered", ALL_FILES, ids=lambda f: str(f.path))
def test_committed_file_equals_a_fresh_render_byte_for_byte(
        repo: Path, tmp_path: Path, rendered: object) -> None:
    write_files(ALL_FILES, tmp_path)
    path = rendered.path  # type: ignore[attr-defined]
    fresh = (tmp_path / path).read_bytes()
    committed = repo / path
    assert committed.is_file(), f"{path} is not committed: run `qpq-ops render all`"
    assert committed.read_bytes() == fresh, f"{path} differs: run `qpq-ops render all`"


@pytest.mark.parametrize("rendered", ALL_FILES, ids=lambda f: str(f.path))
def test_generated_file_opens_with_do_not_edit_header(rendered: object) -> None:
    path, content = rendered.path, rendered.content  # type: ignore[attr-defined]
    if path.suffix == ".json":
        assert json.loads(content)["description"].startswith(HEADER)
    else:
        assert HEADER in content.splitlines()[0]


def test_render_is_deterministic() -> None:
    assert render(Artefact.ALL) == ALL_FILES


def test_each_artefact_renders_its_own_files_and_all_is_their_union() -> None:
    parts = [f for a in Artefact if a is not Artefact.ALL for f in render(a)]
    assert sorted(str(f.path) for f in parts) == sorted(str(f.path) for f in ALL_FILES)
    assert {str(f.path) for f in render(Artefact.ALERTS)} == {
        "prometheus/alerts/qpq-alerts.yml", "prometheus/rules/qpq-recording.yml"}


runner = CliRunner()


def test_render_all_writes_every_file_into_an_empty_root(tmp_path: Path) -> None:
    result = runner.invoke(app, ["render", "all", "--root", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert {f["status"] for f in report["files"]} == {"written"}
    for rendered in ALL_FILES:
        assert (tmp_path / rendered.path).read_text() == rendered.content


def test_check_passes_on_the_repository(repo: Path) -> None:
    result = runner.invoke(app, ["render", "all", "--check", "--root", str(repo)])
    assert result.exit_code == 0, result.output


def test_check_exits_1_and_names_a_hand_edited_file(tmp_path: Path) -> None:
    write_files(ALL_FILES, tmp_path)
    alerts = tmp_path / "prometheus/alerts/qpq-alerts.yml"
    edited = alerts.read_text().replace("> 70", "> 71", 1)
    alerts.write_text(edited)
    result = runner.invoke(app, ["render", "alerts", "--check", "--root", str(tmp_path)])
    assert result.exit_code == ExitCode.WARNING == 1
    assert "prometheus/alerts/qpq-alerts.yml" in result.stderr
    assert "qpq-recording.yml" not in result.stderr
    assert alerts.read_text() == edited  # --check wrote nothing


def test_check_exits_1_when_a_generated_file_is_missing(tmp_path: Path) -> None:
    result = runner.invoke(app, ["render", "dashboard", "--check", "--root", str(tmp_path),
                                 "--json"])
    assert result.exit_code == 1
    assert json.loads(result.stdout)["files"] == [
        {"path": "dashboards/qpq-overview.json", "status": "missing"}]
    assert not (tmp_path / "dashboards").exists()


def test_rendering_again_leaves_files_unchanged(tmp_path: Path) -> None:
    runner.invoke(app, ["render", "docs", "--root", str(tmp_path)])
    result = runner.invoke(app, ["render", "docs", "--root", str(tmp_path), "--json"])
    assert {f["status"] for f in json.loads(result.stdout)["files"]} == {"unchanged"}


def test_missing_root_is_a_usage_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["render", "all", "--root", str(tmp_path / "nope")])
    assert result.exit_code in (ExitCode.USAGE, 2)
    assert "Traceback" not in result.output


def test_unwritable_root_fails_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "prometheus").write_text("a file where a directory must go")
    result = runner.invoke(app, ["render", "alerts", "--root", str(tmp_path)])
    assert result.exit_code == ExitCode.CANNOT_EVALUATE
    assert "cannot write" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_artefact_is_a_usage_error() -> None:
    result = runner.invoke(app, ["render", "grafana"])
    assert result.exit_code == 2


def test_default_root_is_the_qpq_checkout_around_the_current_directory(
        repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(repo / "qpq_ops" / "render")
    result = runner.invoke(app, ["render", "all", "--check", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["root"] == str(repo)


def test_default_root_outside_a_checkout_is_the_current_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["render", "alerts", "--json"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "prometheus/alerts/qpq-alerts.yml").is_file()
