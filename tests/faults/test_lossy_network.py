"""Messages cross a lossy, reordering, 50 ms network exactly once and in order.

A UDP relay (tests/helpers/udp_relay.py) sits between a real client and a real server,
dropping 5 % of datagrams each way, reordering some and delaying all by 50 ms; its
counters show the loss and reordering really happened.
"""

from __future__ import annotations

from pathlib import Path

from qpq_server.client import connect
from tests.helpers.rawclient import session
from tests.helpers.server import running_server
from tests.helpers.udp_relay import UdpRelay

MESSAGES = 30


async def test_messages_arrive_exactly_once_in_order_over_a_lossy_relay(
        tmp_path: Path) -> None:
    with running_server(tmp_path, overrides={"rate_limit": {"enabled": False}}) as srv:
        relay = UdpRelay(("127.0.0.1", srv.quic_port), drop=0.05, reorder=0.1, delay_s=0.05)
        await relay.start()
        try:
            async with connect(relay.address, srv.auth_token, ca=srv.ca_cert,
                               server_name="localhost", timeout=30) as conn:
                alice = await session(conn, "alice")
                bob = await session(conn, "bob")
                sent = [f"message {i}".encode() for i in range(MESSAGES)]
                for payload in sent:
                    await conn.call("enqueue", session=alice, recipients=["bob"],
                                    payload=payload, timeout=30)
                got: list[bytes] = []
                while True:
                    r = await conn.call("fetch", session=bob, limit=7, timeout=30)
                    if not r["messages"]:
                        break
                    got.extend(bytes(m["payload"]) for m in r["messages"])
                    await conn.call("ack", session=bob, ids=[m["id"] for m in r["messages"]],
                                    timeout=30)
        finally:
            relay.close()
    assert got == sent
    c = relay.counters
    print(f"relay: received={c.received} dropped={c.dropped} reordered={c.reordered}")
    assert c.dropped > 0 and c.reordered > 0
    assert c.dropped / c.received > 0.02
