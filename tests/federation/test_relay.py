"""Relaying between two real federated servers: delivery as from USER@DOMAIN, exactly
once and in order, queued while the peer is away, kept across restarts."""

from __future__ import annotations

from pathlib import Path

from qpq_server.devserver import await_until
from tests.federation.conftest import Site


async def test_a_message_to_user_at_peer_is_relayed_and_arrives_from_user_at_origin(
        sites: tuple[Site, Site], tmp_path: Path) -> None:
    a, b = sites
    async with b.client(tmp_path) as cb:
        await cb.register("bob", "pw-bob")
    async with a.client(tmp_path) as ca:
        await ca.register("alice", "pw-alice")
        session = ca.profile("alice").session
        answer = await ca.conn.call("enqueue", session=session, recipients=["bob@b.example"],
                                    payload=b"opaque ciphertext")
        assert len(answer["ids"]) == 1
    async with b.client(tmp_path) as cb:
        async def arrived() -> list[dict[str, object]]:
            got = await cb.conn.call("fetch", session=cb.profile("bob").session, wait_s=1.0)
            return list(got["messages"])

        messages = await await_until(arrived, 20, "the relayed message at b.example")
        assert [(m["from"], m["payload"]) for m in messages] == [
            ("alice@a.example", b"opaque ciphertext")]
    await await_until(lambda: a.running.metric("qpq_federation_relay_total",
                                               peer="b.example", result="sent") == 1,
                      10, "a counting the relay as sent")
    assert b.running.metric("qpq_federation_relay_total", peer="a.example",
                            result="received") == 1
    assert a.running.metric("qpq_federation_peer_up", peer="b.example") == 1
    assert a.running.metric("qpq_federation_queue_depth", peer="b.example") == 0
