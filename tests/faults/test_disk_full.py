"""A real server whose data dir fills up: ENOSPC is answered cleanly, nothing acked is
lost, and service resumes when space is freed.

The test mounts a small size-limited tmpfs (it needs root, as on the CI machines; it
skips otherwise) and keeps the server's log outside it, as production logs are.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

from qpq_server.client.errors import ClientError
from tests.faults.test_crash import integrity
from tests.helpers.rawclient import session
from tests.helpers.server import init_data_dir, start_server

TMPFS_BYTES = 8 * 1024 * 1024
PAYLOAD = 48 * 1024
HEADROOM = 512 * 1024  # what the ballast leaves free: a few messages' worth


@contextlib.contextmanager
def small_filesystem(mountpoint: Path) -> Iterator[Path]:
    mountpoint.mkdir()
    # The suite runs as root (make test-host needs it too): a machine where this cannot
    # mount is a broken test machine, so say so rather than skip the full-disk case.
    assert os.geteuid() == 0 and shutil.which("mount"), \
        "the full-disk test mounts a size-limited tmpfs: run the suite as root"
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES}", "tmpfs",
                           str(mountpoint)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"cannot mount tmpfs here: {done.stderr.strip()}"
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True, check=False)


def fill(path: Path, leave: int) -> None:
    """Write a ballast file until only `leave` bytes are free on path's filesystem."""
    free = shutil.disk_usage(path.parent).free
    with path.open("wb") as f, contextlib.suppress(OSError):
        f.write(b"\0" * max(free - leave, 0))


async def test_enospc_is_answered_cleanly_and_service_resumes(tmp_path: Path) -> None:
    with small_filesystem(tmp_path / "small") as small:
        data_dir = small / "qpq-data"
        config = init_data_dir(data_dir, {"rate_limit": {"enabled": False},
                                          "limits": {"mailbox_max_bytes": 10**9}})
        outside_log = tmp_path / "server-outside.log"
        outside_log.touch()
        (data_dir / "server.log").symlink_to(outside_log)
        srv = start_server(config)
        try:
            async with srv.connect() as conn:
                alice = await session(conn, "alice")
                bob = await session(conn, "bob")
                ballast = small / "ballast"
                fill(ballast, HEADROOM)
                acked: dict[int, bytes] = {}
                refusals: list[str] = []
                for i in range(200):
                    payload = i.to_bytes(4, "big") + os.urandom(PAYLOAD)
                    try:
                        r = await conn.call("enqueue", session=alice, recipients=["bob"],
                                            payload=payload)
                        acked[int(r["ids"][0])] = payload
                    except ClientError as exc:
                        refusals.append(exc.code)
                        if len(refusals) >= 5:
                            break
                assert refusals, "the filesystem never filled"
                assert set(refusals) <= {"internal", "server_busy"}, refusals
                assert (await conn.call("ping"))["ok"]  # the server is up and answering
                assert srv.process.poll() is None

                ballast.unlink()  # space comes back: sends work again, without a restart
                after = os.urandom(1000)
                r = await conn.call("enqueue", session=alice, recipients=["bob"],
                                    payload=after)
                acked[int(r["ids"][0])] = after

                got: dict[int, bytes] = {}
                while True:
                    page = await conn.call("fetch", session=bob, limit=50)
                    if not page["messages"]:
                        break
                    for m in page["messages"]:
                        assert int(m["id"]) not in got, "delivered twice"
                        got[int(m["id"])] = bytes(m["payload"])
                    await conn.call("ack", session=bob,
                                    ids=[m["id"] for m in page["messages"]])
                assert got == acked
        finally:
            srv.stop()
        log = outside_log.read_text(errors="replace")
        assert "Traceback" not in log or "database or disk is full" in log
        integrity(data_dir / "qpq.db", srv.db_key)
