"""Backup and restore speed against the disk's own speed (prints figures; not a test).

    .venv/bin/python bench/backup.py [--size-mb 1000] [--blob-share 0.2] [--dir DIR]

Builds a data dir (`qpq-server init`) holding ~SIZE MB: messages of random (incompressible,
like real ciphertext) payloads in the SQLCipher database, plus a share of that size as
blobs. Then times, in one run on the same disk:
  - `cp` of the same files (database + blobs) followed by an fsync: the ceiling;
  - `qpq-ops backup create` (online snapshot via the SQLite backup API + tar + sha256);
  - `qpq-ops backup verify` (extract, checksums, cipher_integrity_check);
  - `qpq-ops restore` into a fresh data dir (verify + place + purge + doctor).
and prints MB/s for each next to cp's. Caches are warm for every step alike.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qpq_server.datadir import init_data_dir
from qpq_server.secrets import Secret, read_env_file
from qpq_server.storage.sqlcipher import connect_sqlcipher, migrate

QPQ_OPS = str(Path(sys.executable).parent / "qpq-ops")
PAYLOAD = 4096
BATCH = 2000


def build_database(config: Path, target_bytes: int) -> int:
    """Messages with random 4 KB payloads until the database holds ~target_bytes."""
    key = Secret(read_env_file(config.parent / ".env")["QPQ_DB_KEY"])
    conn = connect_sqlcipher(config.parent / "qpq.db", key)
    migrate(conn)
    conn.execute("INSERT INTO accounts VALUES ('alice', x'00', 1, NULL, 0), "
                 "('bob', x'00', 1, NULL, 0)")
    rows = 0
    now = time.time()
    while rows * (PAYLOAD + 100) < target_bytes:
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO messages(recipient, sender, payload, sent_at) VALUES (?, ?, ?, ?)",
            [("bob", "alice", os.urandom(PAYLOAD), now) for _ in range(BATCH)])
        conn.execute("COMMIT")
        rows += BATCH
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return rows


def build_blobs(data_dir: Path, target_bytes: int) -> int:
    count = 0
    size = 1_000_000
    while count * size < target_bytes:
        content = os.urandom(size)
        digest = hashlib.sha256(content).hexdigest()
        path = data_dir / "blobs" / digest[:2] / digest[2:4] / digest
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        path.with_name(digest + ".meta").write_text(json.dumps(
            {"owner": "alice", "size": size, "created_at": time.time(), "pending": ["bob"]}))
        count += 1
    return count


def tree_bytes(*paths: Path) -> int:
    total = 0
    for p in paths:
        total += p.stat().st_size if p.is_file() else sum(
            f.stat().st_size for f in p.rglob("*") if f.is_file())
    return total


def timed(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, str]:
    started = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"{' '.join(argv[:3])} failed ({result.returncode}): {result.stderr}")
    return elapsed, result.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mb", type=float, default=1000.0,
                        help="data to build, in MB (10^6 B); default ~1 GB")
    parser.add_argument("--blob-share", type=float, default=0.2,
                        help="share of the size held as blobs (default 0.2)")
    parser.add_argument("--dir", type=Path, default=None,
                        help="work dir on the disk to measure (default: a temp dir)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="qpq-bench-backup-", dir=args.dir))
    env = {k: v for k, v in os.environ.items() if not k.startswith("QPQ_")}
    try:
        data = work / "data"
        init_data_dir(data)
        config = data / "qpq-server.toml"
        total = args.size_mb * 1e6
        t0 = time.perf_counter()
        rows = build_database(config, total * (1 - args.blob_share))
        blobs = build_blobs(data, total * args.blob_share)
        size = tree_bytes(data / "qpq.db", data / "blobs")
        print(f"built {size / 1e6:,.0f} MB: {rows:,} messages, {blobs} blobs of 1 MB "
              f"in {time.perf_counter() - t0:.1f} s  (work dir {work})")

        copy_dest = work / "cp"
        copy_dest.mkdir()
        started = time.perf_counter()
        subprocess.run(["cp", "-r", str(data / "qpq.db"), str(data / "blobs"), str(copy_dest)],
                       check=True)
        subprocess.run(["sync", "-f", str(copy_dest / "qpq.db")], check=True)
        cp_s = time.perf_counter() - started
        shutil.rmtree(copy_dest)

        backup_s, out = timed([QPQ_OPS, "backup", "create", "--config", str(config),
                               "--dest", str(work / "backups"), "--no-textfile", "--json"], env)
        created = json.loads(out)
        archive = created["archive"]
        key = read_env_file(data / ".env")["QPQ_DB_KEY"]
        verify_s, _ = timed([QPQ_OPS, "backup", "verify", archive, "--config", str(config)], env)
        fresh = work / "fresh"
        init_data_dir(fresh)
        restore_s, out = timed([QPQ_OPS, "restore", archive, "--config",
                                str(fresh / "qpq-server.toml"), "--json"],
                               {**env, "QPQ_DB_KEY": key})
        assert json.loads(out)["doctor"]["ok"]

        mb = size / 1e6
        print(f"\n{'step':<40}{'seconds':>9}{'MB/s':>9}{'vs cp':>8}")
        for name, seconds in (("cp -r + fsync (disk ceiling)", cp_s),
                              ("qpq-ops backup create", backup_s),
                              ("qpq-ops backup verify", verify_s),
                              ("qpq-ops restore (verify+place+doctor)", restore_s)):
            print(f"{name:<40}{seconds:>9.2f}{mb / seconds:>9.1f}{cp_s / seconds:>8.0%}")
        print(f"\narchive {created['size_bytes'] / 1e6:,.0f} MB; backup create reported "
              f"{created['duration_seconds']:.2f} s inside the command")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
