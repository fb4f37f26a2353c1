"""Attachments: streamed, content-addressed, bounded in server memory, refused cleanly
(size, quota, hash, cut-off) without leaving anything behind, expiring when unreferenced."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from qpq_server.client import ClientError, QpqClient
from qpq_server.devserver import BIN, RunningServer, await_until, rss_kb, running_server
from qpq_server.protocol.codec import encode_frame

MAX_BLOB = 55_000_000
QUOTA = 56_000_000
STALL_S = 3.0


@pytest.fixture(scope="module")
def blob_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with running_server(tmp_path_factory.mktemp("blobsrv"), overrides={
            "rate_limit": {"enabled": False},
            "blobs": {"max_blob_bytes": MAX_BLOB, "quota_bytes_per_account": QUOTA,
                      "upload_idle_timeout_s": STALL_S}}) as srv:
        yield srv


@asynccontextmanager
async def client_for(srv: RunningServer, profiles: Path) -> AsyncIterator[QpqClient]:
    async with srv.connect(timeout=30) as conn:
        yield QpqClient(conn, profiles)


def blob_files(srv: RunningServer) -> set[str]:
    root = srv.data_dir / "blobs"
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


class RssSampler:
    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_kb(self.pid))
            time.sleep(0.01)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


async def raw_put(c: QpqClient, session: str, chunks: list[bytes], size: int, sha: bytes,
                  end: bool = True) -> tuple[int, asyncio.Queue[Any]]:
    p = c.conn.protocol
    sid, answers = p.open_stream({"op": "blob_put", "session": session, "size": size,
                                  "sha256": sha})
    for chunk in chunks:
        p.stream_send(sid, encode_frame({"chunk": chunk}))
    if end:
        p.stream_send(sid, b"", end=True)
    return sid, answers


async def answer(c: QpqClient, answers: asyncio.Queue[Any]) -> dict[str, Any]:
    item = await asyncio.wait_for(answers.get(), 20)
    assert isinstance(item, dict), item
    return item


def code_of(response: dict[str, Any]) -> str:
    assert response["ok"] is False, response
    return str(response["error"]["code"])


async def wait_until_files(srv: RunningServer, expected: set[str]) -> None:
    await await_until(lambda: blob_files(srv) == expected, 10, f"blob files == {expected}")


async def wait_until_uploading(srv: RunningServer, count: int) -> None:
    """Until `count` uploads have their temp file under blobs/tmp/."""
    tmp = srv.data_dir / "blobs" / "tmp"
    await await_until(lambda: len(list(tmp.glob("*.part"))) == count, 10,
                      f"{count} upload temp file(s)")


async def test_50mb_file_round_trip_keeps_server_memory_bounded(
        blob_server: RunningServer, tmp_path: Path) -> None:
    source = tmp_path / "big.bin"
    with source.open("wb") as f:
        for _ in range(50):
            f.write(os.urandom(1_000_000))
    want = hashlib.sha256(source.read_bytes()).hexdigest()
    async with client_for(blob_server, tmp_path / "profiles") as c:
        await c.register("big_a", "pw")
        await c.register("big_b", "pw")
        baseline = rss_kb(blob_server.process.pid)
        with RssSampler(blob_server.process.pid) as sampler:
            await c.send_file("big_a", ["big_b"], source)
            saved: list[Path] = []

            async def save(message: Any) -> None:
                saved.append(await c.save_file("big_b", message, tmp_path / "inbox"))

            got = await c.receive("big_b", before_ack=save)
        growth_mb = (sampler.peak - baseline) / 1024
    assert [m.content["type"] for m in got] == ["file"]
    assert saved == [tmp_path / "inbox" / "big.bin"]
    assert hashlib.sha256(saved[0].read_bytes()).hexdigest() == want
    assert growth_mb < 25, f"server RSS grew {growth_mb:.1f} MB for a 50 MB blob"
    # stored as ciphertext under its SHA-256, in the fan-out layout
    blob_id = got[0].content["blob"].hex()
    stored = blob_server.data_dir / "blobs" / blob_id[:2] / blob_id[2:4] / blob_id
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == blob_id
    assert stored.stat().st_size == got[0].content["blob_size"] > 50_000_000
    assert not list((blob_server.data_dir / "blobs" / "tmp").iterdir())
    assert blob_server.metric("qpq_blob_bytes") >= 50_000_000
    assert blob_server.metric("qpq_rpc_duration_seconds_count", op="blob_put") >= 1
    assert blob_server.metric("qpq_rpc_duration_seconds_count", op="blob_get") >= 1


async def test_interrupted_uploads_leave_nothing_behind(
        blob_server: RunningServer, tmp_path: Path) -> None:
    chunk = os.urandom(500_000)
    async with client_for(blob_server, tmp_path / "p") as c:
        await c.register("cut_a", "pw")
        session = c.profile("cut_a").session
        assert session
        before = blob_files(blob_server)
        sid, _ = await raw_put(c, session, [chunk] * 4, 5_000_000, b"\x01" * 32, end=False)
        await wait_until_uploading(blob_server, 1)
        assert len(blob_files(blob_server)) == len(before) + 1  # only the temp file
        c.conn.protocol._quic.reset_stream(sid, 0)  # cut off midway
        c.conn.protocol.transmit()
        await wait_until_files(blob_server, before)
    async with client_for(blob_server, tmp_path / "p") as c:  # connection dropped midway
        await raw_put(c, session, [chunk] * 4, 5_000_000, b"\x02" * 32, end=False)
        await wait_until_uploading(blob_server, 1)
    await wait_until_files(blob_server, before)
    async with client_for(blob_server, tmp_path / "p") as c:
        # the aborted uploads no longer count against the quota
        data = os.urandom(1000)
        ok = await answer(c, (await raw_put(c, session, [data], 1000,
                                            hashlib.sha256(data).digest()))[1])
        assert ok["ok"] is True and ok["existing"] is False
        assert ok["blob_id"] == hashlib.sha256(data).digest()


async def test_stalled_upload_is_refused_and_discarded(
        blob_server: RunningServer, tmp_path: Path) -> None:
    async with client_for(blob_server, tmp_path / "p") as c:
        await c.register("stall_u", "pw")
        session = c.profile("stall_u").session
        assert session
        before = blob_files(blob_server)
        started = time.monotonic()
        _, answers = await raw_put(c, session, [b"x" * 1000], 100_000, b"\x04" * 32, end=False)
        assert code_of(await answer(c, answers)) == "upload_stalled"
        assert STALL_S <= time.monotonic() - started < STALL_S + 5
        await wait_until_files(blob_server, before)
        assert (await c.conn.call("ping"))["ok"] is True


async def test_bad_uploads_are_refused_and_leave_nothing(
        blob_server: RunningServer, tmp_path: Path) -> None:
    async with client_for(blob_server, tmp_path / "p") as c:
        await c.register("bad_up", "pw")
        session = c.profile("bad_up").session
        assert session
        before = blob_files(blob_server)
        data = os.urandom(300_000)
        sha = hashlib.sha256(data).digest()
        cases = [
            ([data], len(data), hashlib.sha256(b"other").digest(), "hash_mismatch"),
            ([data[:1000]], len(data), sha, "bad_request"),  # ended early
            ([data, b"extra"], len(data), sha, "too_large"),  # more than declared
            ([], MAX_BLOB + 1, sha, "too_large"),  # above max_blob_bytes
        ]
        for chunks, size, digest, code in cases:
            _, answers = await raw_put(c, session, chunks, size, digest)
            assert code_of(await answer(c, answers)) == code, (size, code)
        p = c.conn.protocol
        sid, answers = p.open_stream({"op": "blob_put", "session": session, "size": 10,
                                      "sha256": sha})
        p.stream_send(sid, encode_frame({"op": "ping"}), end=True)
        assert code_of(await answer(c, answers)) == "bad_request"
        for bad in ({"size": 10, "sha256": b"short"}, {"size": 0, "sha256": sha},
                    {"size": "10", "sha256": sha}):
            _, answers = p.open_stream({"op": "blob_put", "session": session, **bad}, end=True)
            assert code_of(await answer(c, answers)) == "bad_request"
        _, answers = p.open_stream({"op": "blob_put", "session": "forged.x", "size": 10,
                                    "sha256": sha}, end=True)
        assert code_of(await answer(c, answers)) == "invalid_session"
        await wait_until_files(blob_server, before)
        assert (await c.conn.call("ping"))["ok"] is True  # the connection lives on


async def test_quota_refusal_stops_an_upload_that_is_already_streaming(
        blob_server: RunningServer, tmp_path: Path) -> None:
    async with client_for(blob_server, tmp_path / "p") as c:
        await c.register("quota_u", "pw")
        session = c.profile("quota_u").session
        assert session
        blob = os.urandom(2_000_000)
        await c.conn.put_blob(session, io.BytesIO(blob), len(blob),
                              hashlib.sha256(blob).digest())
        before = blob_files(blob_server)
        started = time.monotonic()
        with pytest.raises(ClientError) as err:
            await c.conn.put_blob(session, _Endless(), MAX_BLOB, b"\x03" * 32)
        assert err.value.code == "quota_exceeded"
        assert time.monotonic() - started < 5  # refused at once, not after streaming it
        await wait_until_files(blob_server, before)


class _Endless:
    def read(self, n: int) -> bytes:
        return b"\x00" * n


async def test_downloads_of_unknown_or_malformed_blob_ids_are_refused(
        blob_server: RunningServer, tmp_path: Path) -> None:
    async with client_for(blob_server, tmp_path / "p") as c:
        await c.register("dl_u", "pw")
        session = c.profile("dl_u").session
        assert session
        with pytest.raises(ClientError) as err:
            await c.conn.get_blob(session, b"\x00" * 32, lambda b: None)
        assert err.value.code == "not_found"
        with pytest.raises(ClientError) as err:
            await c.conn.get_blob(session, b"\x00" * 5, lambda b: None)
        assert err.value.code == "bad_request"
        with pytest.raises(ClientError) as err:
            await c.conn.call("enqueue", session=session, recipients=["dl_u"],
                              payload=b"x", blobs=[b"\x09" * 32])
        assert err.value.code == "not_found"


def cli(srv: RunningServer, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QPQ_")}
    env.update(QPQ_AUTH_TOKEN=srv.auth_token, QPQ_PASSWORD="file-pw")
    return subprocess.run(
        [str(BIN / "qpq-client"), "--server", srv.address, "--ca", str(srv.ca_cert),
         "--server-name", "localhost", "--profile", str(profile), *args],
        capture_output=True, text=True, timeout=60, env=env)


def test_cli_send_file_and_recv_out_decrypt_end_to_end(
        blob_server: RunningServer, tmp_path: Path) -> None:
    profile = tmp_path / "profile"
    for user in ("cli_f_a", "cli_f_b"):
        assert cli(blob_server, profile, "register", user).returncode == 0
    doc = tmp_path / "report.pdf"
    doc.write_bytes(b"%PDF secret quarterly numbers " + os.urandom(200_000))
    sent = cli(blob_server, profile, "send-file", "cli_f_a", "cli_f_b", str(doc))
    assert sent.returncode == 0, sent.stderr
    assert "sent report.pdf to cli_f_b" in sent.stdout
    out = tmp_path / "downloads"
    got = cli(blob_server, profile, "recv", "cli_f_b", "--out", str(out), "--json")
    assert got.returncode == 0, got.stderr
    entry = json.loads(got.stdout)
    assert entry["from"] == "cli_f_a" and entry["file"]["name"] == "report.pdf"
    assert (out / "report.pdf").read_bytes() == doc.read_bytes()
    stored = b"".join(p.read_bytes() for p in (blob_server.data_dir / "blobs").rglob("*")
                      if p.is_file() and not p.name.endswith(".meta"))
    assert b"secret quarterly numbers" not in stored  # the server holds ciphertext only
    missing = cli(blob_server, profile, "send-file", "cli_f_a", "cli_f_b",
                  str(tmp_path / "nope.bin"))
    assert missing.returncode != 0


async def test_unreferenced_blobs_expire_and_referenced_ones_wait_for_download(
        tmp_path: Path) -> None:
    with running_server(tmp_path, overrides={
            "rate_limit": {"enabled": False},
            "retention": {"days": 1.5 / 86400, "sweep_interval_s": 0.3}}) as srv:
        async with client_for(srv, tmp_path / "p") as c:
            await c.register("exp_a", "pw")
            await c.register("exp_b", "pw")
            session = c.profile("exp_a").session
            assert session
            loose = os.urandom(10_000)
            await c.conn.put_blob(session, io.BytesIO(loose), len(loose),
                                  hashlib.sha256(loose).digest())
            doc = tmp_path / "kept.txt"
            doc.write_bytes(b"kept until fetched")
            await c.send_file("exp_a", ["exp_b"], doc)

            def names() -> set[str]:
                return {Path(n).name for n in blob_files(srv)}

            loose_id = hashlib.sha256(loose).hexdigest()
            await await_until(lambda: loose_id not in names(), 15, "the loose blob expiring")
            # A negative check needs time to pass, not a poll: past its own retention and
            # several sweeps later, the referenced blob is still kept.
            await asyncio.sleep(2)
            assert len([n for n in names() if not n.endswith(".meta")]) == 1  # referenced one
            got = await c.receive("exp_b", before_ack=lambda m: c.save_file(
                "exp_b", m, tmp_path / "in"))
            assert (tmp_path / "in" / "kept.txt").read_bytes() == b"kept until fetched"
            assert got
            await wait_until_files(srv, set())
            await await_until(lambda: srv.metric("qpq_blob_bytes") == 0, 10, "qpq_blob_bytes 0")


async def test_store_start_drops_what_was_never_acknowledged(tmp_path: Path) -> None:
    from qpq_server.blobs.store import BlobStore

    def store() -> BlobStore:
        return BlobStore(tmp_path / "blobs", max_blob_bytes=10_000, quota_bytes_per_account=12_000,
                         retention_s=3600)

    s = store()
    await s.open()
    data = os.urandom(5000)
    blob_id = hashlib.sha256(data).hexdigest()
    upload = s.begin_upload("u", blob_id, len(data))
    upload.write(data)
    info = await upload.commit(time.time())
    assert info.size == 5000 and s.usage("u") == 5000
    root = tmp_path / "blobs"
    orphan_meta = root / "aa" / "bb" / ("aabb" + "0" * 60 + ".meta")
    orphan_meta.parent.mkdir(parents=True)
    orphan_meta.write_text('{"owner": "u", "size": 1, "created_at": 0}')
    orphan_blob = root / "cc" / "dd" / ("ccdd" + "0" * 60)
    orphan_blob.parent.mkdir(parents=True)
    orphan_blob.write_bytes(b"x")
    (root / "tmp" / "left.part").write_bytes(b"partial")

    s = store()
    await s.open()
    assert not orphan_meta.exists() and not orphan_blob.exists()
    assert list((root / "tmp").iterdir()) == []
    assert s.get(blob_id) is not None and s.total_bytes == 5000
    # a wrong hash at commit leaves nothing; over-quota is refused before any byte
    bad = s.begin_upload("u", "ee" * 32, 10)
    bad.write(b"0123456789")
    with pytest.raises(Exception, match="sha256"):
        await bad.commit(time.time())
    assert list((root / "tmp").iterdir()) == [] and s.usage("u") == 5000
    with pytest.raises(Exception, match="quota"):
        s.begin_upload("u", "ff" * 32, 8000)


def test_check_config_rejects_bad_blob_and_retention_values(tmp_path: Path) -> None:
    from qpq_server.config import validate_config

    config = tmp_path / "qpq-server.toml"
    config.write_text('[blobs]\nmax_blob_bytes = 0\nquota_bytes_per_account = "1GB"\n'
                      '[retention]\ndays = -1\n[websocket]\ntrust_x_forwarded_for = "yes"\n')
    problems = "\n".join(validate_config(config))
    assert "[blobs] max_blob_bytes must be > 0" in problems
    assert "[blobs] quota_bytes_per_account must be int" in problems
    assert "[retention] days must be > 0" in problems
    assert "[websocket] trust_x_forwarded_for must be bool" in problems


async def test_a_file_that_cannot_be_fetched_leaves_its_message_queued(
        blob_server: RunningServer, tmp_path: Path) -> None:
    doc = tmp_path / "lost.txt"
    doc.write_bytes(b"will vanish on the server")
    async with client_for(blob_server, tmp_path / "p") as c:
        await c.register("lost_a", "pw")
        await c.register("lost_b", "pw")
        await c.send_file("lost_a", ["lost_b"], doc)
        blob_id = ""
        for path in (blob_server.data_dir / "blobs").rglob("*"):
            if path.is_file() and not path.name.endswith(".meta") and path.parent.name != "tmp":
                meta = path.with_name(path.name + ".meta")
                if '"lost_a"' in meta.read_text():
                    blob_id = path.name
                    path.unlink()  # e.g. lost by the operator
        with pytest.raises(ClientError) as err:
            await c.receive("lost_b", before_ack=lambda m: c.save_file(
                "lost_b", m, tmp_path / "in"))
        assert err.value.code == "not_found"
        again = await c.receive("lost_b")  # not acknowledged: still there
        assert [m.content["blob"].hex() for m in again] == [blob_id]
        assert not (tmp_path / "in" / "lost.txt").exists()


async def test_two_workers_referencing_one_blob_at_once_keep_both_references(
        tmp_path: Path) -> None:
    """Workers share blobs/: each .meta update is a read-modify-write of one file, so two
    workers adding recipients at once must not lose one (the blob would expire early)."""
    from qpq_server.blobs.store import BlobStore
    from qpq_server.errors import NotFound

    def worker(n: int) -> BlobStore:
        return BlobStore(tmp_path / "blobs", max_blob_bytes=10_000,
                         quota_bytes_per_account=12_000, retention_s=0, worker=n)

    first, second = worker(0), worker(1)
    await first.open()
    await second.open()
    data = os.urandom(100)
    blob_id = hashlib.sha256(data).hexdigest()
    upload = first.begin_upload("owner", blob_id, len(data))
    upload.write(data)
    await upload.commit(time.time())
    await asyncio.gather(*(store.add_refs([blob_id], [f"r{i}"])
                           for i in range(20) for store in (first, second)))
    pending = first.get(blob_id)
    assert pending is not None and pending.pending == {f"r{i}" for i in range(20)}
    # Expiry on one worker while the other references the blob keeps it.
    for i in range(20):
        await second.downloaded(blob_id, f"r{i}")
    _, late = await asyncio.gather(first.sweep(time.time() + 10),
                                   second.add_refs([blob_id], ["late"]), return_exceptions=True)
    kept = second.get(blob_id)
    if kept is None:  # the sweep won: the reference must then have been refused
        assert isinstance(late, NotFound) and not first.path_for(blob_id).exists()
    else:
        assert kept.pending == {"late"} and first.path_for(blob_id).exists()
