"""Two real users exchange end-to-end-encrypted messages through a real server."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
import sqlcipher3

from qpq_server.devserver import RunningServer, await_until
from qpq_server.secrets import Secret
from qpq_server.storage.sqlcipher import key_pragma
from tests.server.conftest import ClientFactory


async def test_two_users_exchange_messages_end_to_end(server: RunningServer,
                                                      client: ClientFactory) -> None:
    secret_text = "meet at the old mill at 9 " + str(time.time())
    async with client() as c:
        await c.register("alice1", "correct horse")
        await c.register("bob1", "battery staple")
        await c.send_text("alice1", ["bob1"], secret_text)
        got = await c.receive("bob1")
        assert [(m.sender, m.text) for m in got] == [("alice1", secret_text)]
        await c.send_text("bob1", ["alice1"], "ack " + secret_text)
        back = await c.receive("alice1")
        assert [m.text for m in back] == ["ack " + secret_text]
        # delivered messages are acked and gone
        assert await c.receive("bob1") == []
        # a message still queued is stored as ciphertext only
        await c.send_text("alice1", ["bob1"], secret_text + " (queued)")

    db = server.data_dir / "qpq.db"
    raw = db.read_bytes() + (db.with_name("qpq.db-wal").read_bytes()
                             if db.with_name("qpq.db-wal").exists() else b"")
    assert secret_text.encode() not in raw
    assert b"alice1" not in raw  # usernames too: the whole file is encrypted at rest
    assert not raw.startswith(b"SQLite format 3")

    conn = sqlcipher3.connect(str(db))
    conn.execute(key_pragma(Secret(server.db_key)))
    payloads = [bytes(r[0]) for r in conn.execute("SELECT payload FROM messages")]
    conn.close()
    assert payloads and all(secret_text.encode() not in p for p in payloads)

    wrong = sqlcipher3.connect(str(db))
    wrong.execute(key_pragma(Secret("00" * 32)))
    with pytest.raises(sqlcipher3.DatabaseError):
        wrong.execute("SELECT count(*) FROM sqlite_master").fetchone()
    wrong.close()


async def test_multi_recipient_message_reaches_each_recipient(client: ClientFactory) -> None:
    async with client() as c:
        for name in ("m_a", "m_b", "m_c"):
            await c.register(name, "pw-" + name)
        await c.send_text("m_a", ["m_b", "m_c"], "group hello")
        assert [m.text for m in await c.receive("m_b")] == ["group hello"]
        assert [m.text for m in await c.receive("m_c")] == ["group hello"]


async def test_per_recipient_order_is_preserved(client: ClientFactory) -> None:
    async with client() as c:
        await c.register("ord_a", "pw")
        await c.register("ord_b", "pw")
        for i in range(20):
            await c.send_text("ord_a", ["ord_b"], f"m{i}")
        got = await c.receive("ord_b")
        assert [m.text for m in got] == [f"m{i}" for i in range(20)]


async def test_long_poll_fetch_wakes_on_enqueue(server: RunningServer,
                                                client: ClientFactory) -> None:
    async with client() as sender_c, client() as receiver_c:
        await sender_c.register("lp_a", "pw")
        await receiver_c.register("lp_b", "pw")
        started = time.monotonic()
        waiter = asyncio.create_task(receiver_c.receive("lp_b", wait_s=15))
        await await_until(lambda: server.metric("qpq_delivery_waiters") >= 1, 10,
                          "the fetch parking as a long-poll waiter")
        await sender_c.send_text("lp_a", ["lp_b"], "wake up")
        got = await asyncio.wait_for(waiter, 10)
        elapsed = time.monotonic() - started
        assert [m.text for m in got] == ["wake up"]
        assert elapsed < 5, f"long-poll took {elapsed:.1f}s: it did not wake on enqueue"


async def test_long_poll_times_out_empty(client: ClientFactory) -> None:
    async with client() as c:
        await c.register("lp_idle", "pw")
        started = time.monotonic()
        assert await c.receive("lp_idle", wait_s=1.0) == []
        assert 0.9 <= time.monotonic() - started < 5


async def test_one_time_key_package_is_handed_out_once(client: ClientFactory) -> None:
    async with client() as c:
        await c.register("kp_owner", "pw")
        await c.register("kp_asker", "pw")
        session = c.profile("kp_asker").session
        seen = []
        for _ in range(25):  # 20 published, then fall back to the identity key
            keys = await c.conn.call("get_keys", session=session, username="kp_owner")
            seen.append(keys["key_package"])
        packages = [p for p in seen if p is not None]
        assert len(packages) == 20 and len(set(packages)) == 20
        assert seen[-1] is None


async def test_metrics_reflect_traffic(server: RunningServer, client: ClientFactory) -> None:
    before_enqueue = server.metric("qpq_enqueue_total")
    before_fetch = server.metric("qpq_fetch_total")
    before_login = server.metric("qpq_auth_login_success_total")
    async with client() as c:
        await c.register("met_a", "pw")
        await c.register("met_b", "pw")
        for _ in range(3):
            await c.send_text("met_a", ["met_b"], "x")
        assert server.metric("qpq_delivery_queue_depth") >= 3
        await c.receive("met_b")
    assert server.metric("qpq_enqueue_total") == before_enqueue + 3
    assert server.metric("qpq_fetch_total") >= before_fetch + 1
    assert server.metric("qpq_auth_login_success_total") == before_login + 2
    assert server.metric("qpq_tls_handshake_duration_seconds_count") >= 1
    assert server.metric("qpq_db_write_duration_seconds_count") >= 3
    assert server.metric("qpq_connections_max") == 10000
    assert server.metric("qpq_tls_cert_expiry_timestamp_seconds") > time.time() + 300 * 86400


def test_health_endpoints(server: RunningServer) -> None:
    assert httpx.get(server.metrics_url + "/healthz").status_code == 200
    assert httpx.get(server.metrics_url + "/readyz").status_code == 200
    assert httpx.get(server.metrics_url + "/nope").status_code == 404


def test_logs_never_contain_secrets(server: RunningServer) -> None:
    log = server.log()
    assert server.auth_token not in log and server.db_key not in log
    assert "correct horse" not in log and "meet at the old mill" not in log


