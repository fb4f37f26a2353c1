"""pyproject.toml's package data names only files that exist (a stale glob ships nothing)."""

from __future__ import annotations

import tomllib
from pathlib import Path


def test_every_package_data_glob_matches_a_file(repo: Path) -> None:
    project = tomllib.loads((repo / "pyproject.toml").read_text())
    package_data: dict[str, list[str]] = project["tool"]["setuptools"]["package-data"]
    assert package_data
    for package, globs in package_data.items():
        root = repo / package.replace(".", "/")
        for pattern in globs:
            assert [p for p in root.glob(pattern) if p.is_file()], (
                f"[tool.setuptools.package-data] {package}: {pattern!r} matches no file "
                f"under {root.relative_to(repo)}/")
