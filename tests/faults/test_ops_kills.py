"""kill -9 of `qpq-ops rotate db-key` and `qpq-ops restore` at points during the run.

Each run is a real `qpq-ops` process on a real data dir holding a few MB of messages
(so the re-key and the copy take long enough to be hit). It is killed either after a
fixed delay or a few milliseconds after a milestone appears on disk (the new key
written to `.env`, the restore's staging dir, the old data moved aside), then:

* rotate: exactly one of the keys in `.env` (QPQ_DB_KEY, QPQ_DB_KEY_NEXT) opens the
  database, no row is lost, both integrity checks pass, and a rerun completes;
* restore: the live database opens with the data dir's key and holds either the old
  data or the restored data, never a mix or nothing, and a rerun completes.

Milestones are found by polling: no test hook lives in qpq-ops. `make soak`
(QPQ_SOAK=1) adds ten kills at random delays to each.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import sqlcipher3

from qpq_server.errors import WrongDatabaseKey
from qpq_server.secrets import Secret, read_env_file
from qpq_server.storage.sqlcipher import connect_sqlcipher
from tests.backup.support import ops, populate
from tests.helpers.server import BIN, init_data_dir

BULK_MESSAGES = 2000
BULK_BYTES = 1000  # ~2 MB of payload: the re-key and the copies take visible time
RUN_TIMEOUT_S = 60.0
SOAK = os.environ.get("QPQ_SOAK") == "1"

Milestone = Callable[[], bool]


# Probing with the wrong key makes SQLCipher log every failed page to stderr.
sqlcipher3.connect(":memory:").execute("PRAGMA cipher_log_level = NONE")


@dataclass(frozen=True)
class KillAt:
    """Kill `delay_s` after the process starts, or after `milestone` turns true."""

    label: str
    delay_s: float
    milestone: Milestone | None = None


def _soak_plans() -> list[KillAt]:
    rng = random.Random()
    return [KillAt(f"random {d:.2f} s", d)
            for d in sorted(rng.uniform(0.3, 6.0) for _ in range(10))] if SOAK else []


def _bulk(config: Path, sender: str, recipient: str) -> None:
    key = read_env_file(config.parent / ".env")["QPQ_DB_KEY"]
    conn = connect_sqlcipher(config.parent / "qpq.db", Secret(key))
    try:
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO messages(recipient, sender, payload, sent_at) VALUES (?, ?, ?, ?)",
            [(recipient, sender, os.urandom(BULK_BYTES), float(i))
             for i in range(BULK_MESSAGES)])
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()


def _opens(db: Path, key: str) -> bool:
    try:
        connect_sqlcipher(db, Secret(key)).close()
    except WrongDatabaseKey:
        return False
    return True


def _content(db: Path, key: str) -> str:
    """Integrity-checked digest of every account and message (key packages excluded:
    a restore purges them on purpose)."""
    conn = connect_sqlcipher(db, Secret(key))
    try:
        assert conn.execute("PRAGMA cipher_integrity_check").fetchall() == []
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        digest = hashlib.sha256()
        for table, columns in (("accounts", "username, password_file"),
                               ("messages", "id, recipient, sender, payload, sent_at")):
            for row in conn.execute(f"SELECT {columns} FROM {table} ORDER BY 1"):
                digest.update(repr(row).encode())
        return digest.hexdigest()
    finally:
        conn.close()


def _ops_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QPQ_")}
    return {**env, **(extra or {})}


def _run_killed(args: list[str], kill: KillAt, env: dict[str, str]) -> bool:
    """Run `qpq-ops ARGS`, SIGKILL it at `kill`; True if it was killed, False if it
    finished first (then it must have succeeded)."""
    proc = subprocess.Popen([str(BIN / "qpq-ops"), *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    started = time.monotonic()
    deadline = started + RUN_TIMEOUT_S
    fire_at = None if kill.milestone else started + kill.delay_s
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            now = time.monotonic()
            if fire_at is None and kill.milestone is not None and kill.milestone():
                fire_at = now + kill.delay_s
            if fire_at is not None and now >= fire_at:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=10)
                return True
            time.sleep(0.001)
        assert proc.poll() is not None, f"qpq-ops {args[0]} did not finish in time"
        _, stderr = proc.communicate(timeout=10)
        assert proc.returncode == 0, stderr
        return False
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def test_rotate_db_key_survives_kill_9_at_any_step(tmp_path: Path) -> None:
    config = init_data_dir(tmp_path / "d")
    asyncio.run(populate(config, tmp_path / "p"))
    _bulk(config, "alice", "bob")
    env_file, db = config.parent / ".env", config.parent / "qpq.db"
    original = _content(db, read_env_file(env_file)["QPQ_DB_KEY"])
    backups = config.parent / "pre-rotation-backups"

    def next_key_written() -> bool:
        return "QPQ_DB_KEY_NEXT" in env_file.read_text()

    def backup_started() -> bool:
        return backups.is_dir() and any(backups.iterdir())

    plans = [KillAt("early", 0.4), KillAt("backup", 0.0, backup_started),
             KillAt("next key", 0.0, next_key_written),
             KillAt("next key+10ms", 0.010, next_key_written),
             KillAt("next key+0.2s", 0.2, next_key_written),
             KillAt("next key+0.6s", 0.6, next_key_written), *_soak_plans()]
    killed: list[str] = []
    args = ["rotate", "db-key", "--config", str(config), "--json"]
    for plan in plans:
        shutil.rmtree(backups, ignore_errors=True)  # so "backup started" means this run's
        key_before = read_env_file(env_file)["QPQ_DB_KEY"]
        started = time.monotonic()
        was_killed = _run_killed(args, plan, _ops_env())
        elapsed = time.monotonic() - started
        values = read_env_file(env_file)
        keys = [values["QPQ_DB_KEY"], *([values["QPQ_DB_KEY_NEXT"]]
                                        if values.get("QPQ_DB_KEY_NEXT") else [])]
        opening = [k for k in keys if _opens(db, k)]
        assert len(opening) == 1, f"after a kill at {plan.label}: {len(opening)} keys open it"
        if was_killed:
            which = "old" if opening[0] == key_before else "new"
            killed.append(f"{plan.label} after {elapsed:.2f} s: {which} key opens")
        assert _content(db, opening[0]) == original, f"rows changed by a kill at {plan.label}"

        rerun = subprocess.run([str(BIN / "qpq-ops"), *args], env=_ops_env(),
                               capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
        assert rerun.returncode == 0, f"rerun after {plan.label}: {rerun.stderr}"
        values = read_env_file(env_file)
        assert "QPQ_DB_KEY_NEXT" not in values
        assert [k for k in keys if k != values["QPQ_DB_KEY"] and _opens(db, k)] == []
        assert _content(db, values["QPQ_DB_KEY"]) == original
    print("rotate killed at", "; ".join(killed))
    # Delay-based plans can miss on a fast or a loaded machine; the milestone plans
    # (a file just appeared) land: at least three distinct steps must be hit.
    assert len(killed) >= 3, f"only {killed} were killed mid-run; the plans missed"


def test_restore_survives_kill_9_at_any_step(tmp_path: Path) -> None:
    source = init_data_dir(tmp_path / "src")
    asyncio.run(populate(source, tmp_path / "ps"))
    _bulk(source, "alice", "bob")
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
    old = _content(db, target_key)
    assert old != restored
    own = ops("backup", "create", "--config", target, "--dest", tmp_path / "own",
              "--no-textfile", "--json")
    assert own.exit_code == 0, own.stderr

    def staged() -> bool:
        return any(p.name.startswith(".qpq-restore-") for p in data_dir.iterdir())

    def moving_aside() -> bool:
        return any(p.name.startswith("pre-restore-") for p in data_dir.iterdir())

    plans = [KillAt("early", 0.4), KillAt("staging", 0.0, staged),
             KillAt("staging+0.1s", 0.1, staged),
             KillAt("aside", 0.0, moving_aside), KillAt("aside+5ms", 0.005, moving_aside),
             *_soak_plans()]
    args = ["restore", archive, "--config", str(target), "--force", "--json"]
    env = _ops_env({"QPQ_DB_KEY": source_key})
    killed, outcomes = [], []
    for round_, plan in enumerate(plans):
        # Earlier rounds' aside dirs go elsewhere, so the milestones see this run's only.
        for path in data_dir.iterdir():
            if path.name.startswith("pre-restore-"):
                path.rename(tmp_path / f"aside-{round_}-{path.name}")
        if _run_killed(args, plan, env):
            killed.append(plan.label)
        assert _opens(db, target_key), f"after a kill at {plan.label} the key does not open"
        now = _content(db, target_key)
        assert now in (old, restored), f"a kill at {plan.label} left neither data set"
        outcomes.append(f"{plan.label}: {'old' if now == old else 'restored'}")

        rerun = subprocess.run([str(BIN / "qpq-ops"), *args], env=env,
                               capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
        assert rerun.returncode == 0, f"rerun after {plan.label}: {rerun.stderr}"
        assert _content(db, target_key) == restored
        leftovers = [p.name for p in data_dir.iterdir() if p.name.startswith(".qpq-restore-")]
        assert leftovers == [], f"a kill at {plan.label} left staging dirs behind"
        # The next round starts from the old data again (restored from its own backup).
        back = ops("restore", own.json()["archive"], "--config", target, "--force",
                   env={"QPQ_DB_KEY": target_key})
        assert back.exit_code == 0, back.stderr
        assert _content(db, target_key) == old
    print("restore killed at", "; ".join(outcomes))
    assert len(killed) >= 4, f"only {killed} were killed mid-run; the plans missed"
    assert any(o.endswith(": old") for o in outcomes)

