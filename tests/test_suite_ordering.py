"""tests/helpers/ordering.py: the longest-first list stays true to the files it names."""

from __future__ import annotations

from pathlib import Path

from tests.helpers.ordering import LONGEST_FIRST

REPO = Path(__file__).resolve().parents[1]


def test_the_longest_first_list_names_files_that_exist() -> None:
    """A renamed or split test file must be renamed in the list too."""
    missing = [path for path in LONGEST_FIRST if not (REPO / path).is_file()]
    assert not missing, missing
    assert len(set(LONGEST_FIRST)) == len(LONGEST_FIRST)


def test_make_keeps_the_order_xdist_would_otherwise_change() -> None:
    """Every `--dist loadfile` run in the Makefile keeps the collection order (xdist sorts
    files by their number of tests by default, which undoes the list)."""
    runs = [line for line in (REPO / "Makefile").read_text().splitlines()
            if "--dist loadfile" in line]
    assert runs
    assert all("--no-loadscope-reorder" in line for line in runs), runs
