"""kill -9 of the real server at a random moment under a send load, then restart.

Every acknowledged message is delivered exactly once after the restart (unacked ones
at most once), and the database passes `PRAGMA cipher_integrity_check` and
`PRAGMA integrity_check`. 3 rounds in `make test`, 50 under `make soak` (QPQ_SOAK=1); the same with
one of two workers killed (1 round, 20 in soak).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
from pathlib import Path

import httpx
import msgpack
import sqlcipher3

from qpq_server.client import QpqConnection
from qpq_server.client.errors import ClientError
from qpq_server.secrets import Secret
from qpq_server.storage.sqlcipher import key_pragma
from tests.helpers.rawclient import login, session
from tests.helpers.server import RunningServer, init_data_dir, start_server

SOAK = os.environ.get("QPQ_SOAK") == "1"
ROUNDS = 50 if SOAK else 3
WORKER_ROUNDS = 20 if SOAK else 1
SENDERS = 4


async def _open(srv: RunningServer) -> QpqConnection:
    cm = srv.connect(timeout=5)
    conn = await cm.__aenter__()
    conn._cm = cm  # type: ignore[attr-defined]  # closed by _close
    return conn


async def _close(conn: QpqConnection) -> None:
    with contextlib.suppress(Exception):  # the server may be dead already
        await conn._cm.__aexit__(None, None, None)  # type: ignore[attr-defined]


async def _send_until_dead(srv: RunningServer, sender: int, sess: str,
                           acked: dict[bytes, int], stop: asyncio.Event, round_: int) -> None:
    conn = await _open(srv)
    try:
        seq = 0
        while not stop.is_set():
            payload = msgpack.packb([round_, sender, seq])
            seq += 1
            try:
                r = await conn.call("enqueue", session=sess, recipients=["sink"],
                                    payload=payload, timeout=2)
            except (ClientError, TimeoutError, ConnectionError, OSError):
                return  # the server died under us: this one was not acked
            acked[payload] = int(r["ids"][0])
    finally:
        await _close(conn)


def integrity(db: Path, key: str) -> None:
    conn = sqlcipher3.connect(str(db))
    try:
        conn.execute(key_pragma(Secret(key)))
        cipher = conn.execute("PRAGMA cipher_integrity_check").fetchall()
        assert cipher == [], f"cipher_integrity_check: {cipher[:5]}"
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        conn.close()


async def _drain(srv: RunningServer, sess: str) -> list[bytes]:
    conn = await _open(srv)
    got: list[bytes] = []
    try:
        while True:
            r = await conn.call("fetch", session=sess, limit=500)
            if not r["messages"]:
                return got
            got.extend(bytes(m["payload"]) for m in r["messages"])
            await conn.call("ack", session=sess, ids=[m["id"] for m in r["messages"]])
    finally:
        await _close(conn)


async def test_kill_9_under_send_load_loses_no_acked_message(tmp_path: Path) -> None:
    rng = random.Random(int(os.environ.get("QPQ_FAULT_SEED", "17")))
    config = init_data_dir(tmp_path / "data", {"rate_limit": {"enabled": False}})
    srv = start_server(config)
    try:
        conn = await _open(srv)
        try:
            senders = [await session(conn, f"w{i}") for i in range(SENDERS)]
            sink = await session(conn, "sink")
        finally:
            await _close(conn)
        for round_ in range(ROUNDS):
            acked: dict[bytes, int] = {}
            stop = asyncio.Event()
            tasks = [asyncio.create_task(_send_until_dead(srv, i, s, acked, stop, round_))
                     for i, s in enumerate(senders)]
            await asyncio.sleep(rng.uniform(0.3, 1.5))
            srv.process.send_signal(signal.SIGKILL)
            srv.process.wait(timeout=10)
            stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks), timeout=30)
            assert acked, f"round {round_}: no message was acked before the kill"
            integrity(srv.data_dir / "qpq.db", srv.db_key)
            srv = start_server(config)
            delivered = await _drain(srv, sink)
            this_round = [p for p in delivered if msgpack.unpackb(p)[0] == round_]
            assert len(this_round) == len(set(this_round)), "a message was delivered twice"
            missing = set(acked) - set(this_round)
            assert not missing, f"round {round_}: {len(missing)} acked messages lost"
            # Sessions survive a restart (signed tokens, key on disk).
            conn = await _open(srv)
            try:
                await login(conn, "sink")
            finally:
                await _close(conn)
    finally:
        srv.stop()
    integrity(srv.data_dir / "qpq.db", srv.db_key)


def _ready(srv: RunningServer) -> bool:
    try:
        return httpx.get(srv.metrics_url + "/readyz", timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


async def test_kill_9_of_one_worker_loses_no_acked_message(tmp_path: Path) -> None:
    """Two workers behind SO_REUSEPORT; one dies by kill -9 under load, the supervisor
    restarts it; what either worker acked is delivered exactly once."""
    rng = random.Random(int(os.environ.get("QPQ_FAULT_SEED", "17")))
    config = init_data_dir(tmp_path / "data", {"rate_limit": {"enabled": False},
                                               "server": {"workers": 2}})
    srv = start_server(config, ready_timeout=60)
    try:
        conn = await _open(srv)
        try:
            senders = [await session(conn, f"w{i}") for i in range(SENDERS * 2)]
            sink = await session(conn, "sink")
        finally:
            await _close(conn)
        for round_ in range(WORKER_ROUNDS):
            acked: dict[bytes, int] = {}
            stop = asyncio.Event()
            tasks = [asyncio.create_task(_send_until_dead(srv, i, s, acked, stop, round_))
                     for i, s in enumerate(senders)]
            await asyncio.sleep(rng.uniform(0.3, 1.5))
            workers = _children(srv.process.pid)
            assert len(workers) == 2, workers
            os.kill(rng.choice(workers), signal.SIGKILL)
            await asyncio.sleep(0.5)
            stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks), timeout=30)
            assert acked and srv.process.poll() is None
            deadline = asyncio.get_running_loop().time() + 60
            while len(_children(srv.process.pid)) < 2 or not _ready(srv):
                assert asyncio.get_running_loop().time() < deadline, "worker not restarted"
                await asyncio.sleep(0.2)
            delivered = await _drain(srv, sink)
            this_round = [p for p in delivered if msgpack.unpackb(p)[0] == round_]
            assert len(this_round) == len(set(this_round)), "a message was delivered twice"
            missing = set(acked) - set(this_round)
            assert not missing, f"round {round_}: {len(missing)} acked messages lost"
    finally:
        srv.stop()
    integrity(srv.data_dir / "qpq.db", srv.db_key)
