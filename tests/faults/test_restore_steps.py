"""kill -9 of `qpq-ops restore` at every step that changes the data dir.

The old database holds rows only in its WAL (its server was killed, nothing
checkpointed them). A real `qpq-ops restore` process kills itself with SIGKILL just
before its Nth rename/link/replace in the restore module, for N = 1, 2, ... until a run
completes. After each kill:

* the live database opens with the data dir's key and holds the old data (WAL rows
  included) or the restored data, never a mix; or, only when no key could fold the WAL
  into the old file first (second pass), the old file with its WAL aside, the journal
  left: then the server refuses to start and `restore --resume` puts them back;
* a rerun completes the restore and says what it found (`recovered`), and the old
  data, every WAL row included, is whole in one aside dir.

The step counter is a wrapper installed by the test around `os.replace`, `os.rename`
and `os.link` in the child process: the product has no test hook.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from qpq_server.core import refuse_interrupted_restore
from qpq_server.errors import StorageError
from qpq_server.secrets import read_env_file
from qpq_server.storage.base import RESTORE_JOURNAL
from tests.backup.support import ops, populate
from tests.faults.test_ops_kills import _content, _opens, _ops_env
from tests.helpers.server import init_data_dir

RUN_TIMEOUT_S = 60.0
pytestmark = pytest.mark.timeout(600)  # ~20 restores; a loaded 2-core machine is slow
MAX_STEPS = 60  # far more than a restore takes: a runaway loop fails instead of hanging

_KILLING_OPS = textwrap.dedent("""
    import os, signal, sys
    target, seen = int(os.environ["KILL_AT_STEP"]), 0
    watched = ("qpq_ops/backup/restore.py", "qpq_ops/backup/journal.py")

    def counted(fn):
        def step(*args, **kwargs):
            global seen
            caller = sys._getframe(1).f_code.co_filename
            if caller.endswith(watched):
                seen += 1
                if seen == target:
                    os.kill(os.getpid(), signal.SIGKILL)
            return fn(*args, **kwargs)
        return step

    os.replace, os.rename, os.link = (counted(os.replace), counted(os.rename),
                                      counted(os.link))
    if os.environ.get("NO_CHECKPOINT"):  # as when no key opens the old database
        import qpq_ops.backup.restore
        qpq_ops.backup.restore._checkpoint_old = lambda *args: None
    from qpq_ops.cli import main
    sys.argv = ["qpq-ops", *sys.argv[1:]]
    main()
""")


def _wal_rows(db: Path, key: str) -> None:
    """Insert rows and die without closing: they stay in the WAL only, as after a crash."""
    code = textwrap.dedent(f"""
        import os
        from qpq_server.secrets import Secret
        from qpq_server.storage.sqlcipher import connect_sqlcipher
        conn = connect_sqlcipher({str(db)!r}, Secret({key!r}))
        conn.execute("PRAGMA wal_autocheckpoint = 0")
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO messages(recipient, sender, payload, sent_at)"
                         " VALUES (?, ?, ?, ?)",
                         [("bob", "alice", os.urandom(200), 1e9 + i) for i in range(50)])
        conn.execute("COMMIT")
        os._exit(0)
    """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=RUN_TIMEOUT_S)


def _content_of_copy(data_dir: Path, key: str, scratch: Path) -> str:
    """Digest of the database in `data_dir` with its WAL, read from a copy (opening the
    original would checkpoint it)."""
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    for suffix in ("", "-wal", "-shm"):
        if (data_dir / f"qpq.db{suffix}").exists():
            shutil.copy2(data_dir / f"qpq.db{suffix}", scratch / f"qpq.db{suffix}")
    return _content(scratch / "qpq.db", key)


def test_restore_killed_at_every_step_keeps_the_old_wal_rows(tmp_path: Path) -> None:
    source = init_data_dir(tmp_path / "src")
    asyncio.run(populate(source, tmp_path / "ps", messages=2))
    source_key = read_env_file(source.parent / ".env")["QPQ_DB_KEY"]
    restored = _content(source.parent / "qpq.db", source_key)
    created = ops("backup", "create", "--config", source, "--dest", tmp_path / "b",
                  "--no-textfile", "--json")
    assert created.exit_code == 0, created.stderr
    archive = created.json()["archive"]

    target = init_data_dir(tmp_path / "dst")
    asyncio.run(populate(target, tmp_path / "pt", messages=1))
    data_dir, db = target.parent, target.parent / "qpq.db"
    target_key = read_env_file(data_dir / ".env")["QPQ_DB_KEY"]
    _wal_rows(db, target_key)
    assert (data_dir / "qpq.db-wal").stat().st_size > 0
    pristine = tmp_path / "pristine"
    shutil.copytree(data_dir, pristine, symlinks=True)
    old = _content_of_copy(pristine, target_key, tmp_path / "scratch")
    without_wal = _content(shutil.copy(pristine / "qpq.db", tmp_path / "nowal.db"),
                           target_key)
    assert len({old, restored, without_wal}) == 3

    args = ["restore", archive, "--config", str(target), "--force", "--json"]
    env = _ops_env({"QPQ_DB_KEY": source_key})
    # With the checkpoint, the steps up to the new database's rename; without it (as
    # when no key opens the old database) every step: the later ones are the same code.
    for mode, least in (("checkpointed", 2), ("wal kept", 5)):
        outcomes = _kill_every_step(
            {**env, **({"NO_CHECKPOINT": "1"} if mode == "wal kept" else {})}, args,
            data_dir, pristine, target_key, (old, restored, without_wal), tmp_path,
            until_swapped=mode == "checkpointed")
        print(f"restore ({mode}) killed at steps", "; ".join(outcomes))
        assert len(outcomes) >= least, outcomes


def _kill_every_step(env: dict[str, str], args: list[str], data_dir: Path, pristine: Path,
                     target_key: str, contents: tuple[str, str, str], tmp_path: Path,
                     until_swapped: bool) -> list[str]:
    old, restored, without_wal = contents
    db = data_dir / "qpq.db"
    outcomes: list[str] = []
    for step in range(1, MAX_STEPS):
        shutil.rmtree(data_dir)
        shutil.copytree(pristine, data_dir, symlinks=True)
        run = subprocess.run([sys.executable, "-c", _KILLING_OPS, *args],
                             env={**env, "KILL_AT_STEP": str(step)}, capture_output=True,
                             text=True, timeout=RUN_TIMEOUT_S)
        if run.returncode == 0:
            break  # no step `step`: every kill point has been tried
        assert run.returncode == -9, f"step {step}: {run.stderr}"
        assert _opens(db, target_key), f"after a kill at step {step} the key does not open"
        now = _content_of_copy(data_dir, target_key, tmp_path / "scratch")
        journal_left = (data_dir / RESTORE_JOURNAL).exists()
        if now == without_wal and journal_left:
            # WAL already aside, new file not yet in: the server refuses to start and
            # --resume puts the old file and its WAL back together.
            with pytest.raises(StorageError, match="restore --resume"):
                refuse_interrupted_restore(data_dir)
            resumed = ops("restore", "--resume", "--config", args[3], "--json")
            assert resumed.exit_code == 0, f"resume after step {step}: {resumed.stderr}"
            assert resumed.json()["recovered"]
            now = _content_of_copy(data_dir, target_key, tmp_path / "scratch")
            assert now == old, f"--resume after step {step} did not put the old data back"
            outcomes.append(f"{step}: old without WAL +journal, resumed to old")
            journal_left = False
        else:
            assert now in (old, restored), f"a kill at step {step} left neither data set" + (
                " (the old database without its WAL rows and no journal)"
                if now == without_wal else "")
            outcomes.append(f"{step}: {'old' if now == old else 'restored'}"
                            f"{' +journal' if journal_left else ''}")

        # in process: the same code as the command, without a second interpreter start
        rerun = ops(*args, env={k: v for k, v in env.items() if k == "QPQ_DB_KEY"})
        assert rerun.exit_code == 0, f"rerun after step {step}: {rerun.stderr}"
        recovered = rerun.json()["recovered"]
        assert bool(recovered) == journal_left, recovered
        assert _content(db, target_key) == restored
        asides = sorted(p for p in data_dir.iterdir() if p.name.startswith("pre-restore-"))
        whole = [p.name for p in asides if (p / "qpq.db").exists()
                 and _content_of_copy(p, target_key, tmp_path / "scratch") == old]
        assert whole, f"after a kill at step {step} and a rerun no aside dir holds the " \
                      f"old data whole ({[p.name for p in asides]})"
        assert not (data_dir / RESTORE_JOURNAL).exists()
        if until_swapped and now == restored:
            break
    else:
        raise AssertionError(f"the restore still had steps after {MAX_STEPS}")
    return outcomes
