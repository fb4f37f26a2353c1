"""The committed fuzz corpus is replayed, then atheris runs for a fixed budget.

`make test`: every corpus file once through `frame_target.one_input`, then atheris
(when installed) for FUZZ_RUNS inputs in a subprocess on a copy of the corpus. `make
soak` (QPQ_SOAK=1) gives atheris minutes instead. A crash input atheris finds is left
in the test's tmp dir and named in the failure; commit it to the corpus once fixed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fuzz.frame_target import one_input

CORPUS = Path(__file__).parent / "corpus" / "frames"
SOAK = os.environ.get("QPQ_SOAK") == "1"
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted(CORPUS.iterdir()), ids=lambda p: p.name)
def test_corpus_input_raises_only_qpq_errors(path: Path) -> None:
    one_input(path.read_bytes())


def test_atheris_fixed_budget(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    shutil.copytree(CORPUS, corpus)
    budget = ["-max_total_time=600"] if SOAK else ["-runs=8000"]
    done = subprocess.run(
        [sys.executable, "-m", "tests.fuzz.frame_target", str(corpus), *budget,
         "-rss_limit_mb=1024", "-seed=17", f"-artifact_prefix={tmp_path}/"],
        cwd=REPO, capture_output=True, text=True, timeout=900 if SOAK else 120, check=False)
    crashes = [p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "oom-"))]
    assert done.returncode == 0 and not crashes, (crashes, done.stderr[-3000:])
