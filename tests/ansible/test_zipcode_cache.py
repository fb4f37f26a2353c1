"""The playbook tests' cache of compiled zipped module code (tests/ansible/zipcode)."""

from __future__ import annotations

import marshal
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.ansible.runner import ZIPCODE_DIR


def run_from_zip(tmp_path: Path, cache: Path, source: str) -> str:
    """Import module `m` from a fresh zip in a new interpreter; what it printed."""
    archive = tmp_path / "payload.zip"
    archive.unlink(missing_ok=True)
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("m.py", source)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(ZIPCODE_DIR),
           "QPQ_TEST_ZIPCODE_CACHE": str(cache)}
    proc = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(archive)!r}); import m"],
                          env=env, capture_output=True, text=True, timeout=60, check=True)
    return proc.stdout.strip()


def entries(cache: Path) -> list[Path]:
    return sorted(p for p in cache.iterdir() if not p.name.endswith(".partial"))


def test_compiled_code_is_kept_per_source_and_reused(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    assert run_from_zip(tmp_path, cache, "print('one')") == "one"
    (first,) = entries(cache)
    # Reused: the entry, not the zip's source, is what runs for the same source.
    first.write_bytes(marshal.dumps(compile("print('from the cache')", "m.py", "exec")))
    assert run_from_zip(tmp_path, cache, "print('one')") == "from the cache"
    # A changed module is compiled afresh, beside the old entry.
    assert run_from_zip(tmp_path, cache, "print('two')") == "two"
    assert len(entries(cache)) == 2


def test_a_cache_others_can_write_is_not_used(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    run_from_zip(tmp_path, cache, "print('one')")
    (entry,) = entries(cache)
    entry.write_bytes(marshal.dumps(compile("print('planted')", "m.py", "exec")))
    cache.chmod(0o777)
    assert run_from_zip(tmp_path, cache, "print('one')") == "one"


def test_a_broken_entry_is_compiled_again(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    run_from_zip(tmp_path, cache, "print('one')")
    (entry,) = entries(cache)
    entry.write_bytes(b"not marshal data")
    assert run_from_zip(tmp_path, cache, "print('one')") == "one"
