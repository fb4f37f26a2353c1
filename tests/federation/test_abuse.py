"""What an authenticated peer still cannot do: claim senders of another domain, get a
relay delivered twice, or get past the limits local senders have."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from qpq_server.federation.certs import CERT, KEY, load_certificates, load_private_key
from qpq_server.federation.link import LinkError, PeerLink, open_link
from tests.federation.conftest import Site, make_sites
from tests.federation.test_relay import register


@asynccontextmanager
async def as_a(b: Site, root: Path) -> AsyncIterator[PeerLink]:
    """A link to b.example authenticated as a.example (the test plays the peer)."""
    certs = root / "certs-a.example"
    link = await open_link(
        f"127.0.0.1:{b.fed_port}", "b.example", "a.example",
        ca_pem=load_certificates(root / "ca" / "federation-ca.der")[0].public_bytes(
            Encoding.PEM),
        certificate=load_certificates(certs / CERT)[0], key=load_private_key(certs / KEY))
    try:
        yield link
    finally:
        link.close()


def relay(relay_id: int, sender: str, payload: bytes, to: str = "bob") -> dict[str, Any]:
    return {"id": relay_id, "from": sender, "to": to, "payload": payload}


async def fetch(b: Site, session: str) -> list[tuple[str, bytes]]:
    async with b.running.connect() as conn:
        page = await conn.call("fetch", session=session)
    return [(m["from"], m["payload"]) for m in page["messages"]]


async def test_a_peer_cannot_claim_senders_of_another_domain_nor_deliver_twice(
        tmp_path: Path) -> None:
    _, b = make_sites(tmp_path)
    b.start()
    try:
        bob = await register(b, tmp_path, "bob")
        async with as_a(b, tmp_path) as link:
            answer = await link.call("relay", relays=[
                relay(1, "mallory@c.example", b"forged"),
                relay(2, "bob", b"posing as a local user"),
                relay(3, "alice@a.example", b"genuine"),
                relay(3, "alice@a.example", b"genuine"),
                relay(4, "alice@a.example", b"to nobody", to="nobody")])
            assert answer["results"] == ["forged_sender", "forged_sender", "delivered",
                                         "duplicate", "unknown_user"]
            again = await link.call("relay", relays=[relay(3, "alice@a.example", b"genuine")])
            assert again["results"] == ["duplicate"]
            with pytest.raises(LinkError) as err:  # key lookups: for its own users only
                await link.call("keys", username="bob", requester="eve@c.example")
            assert err.value.code == "bad_request"
            keys = await link.call("keys", username="bob", requester="alice@a.example")
            assert isinstance(keys["identity_key"], bytes) and keys["kt"]["head"]
        assert await fetch(b, bob) == [("alice@a.example", b"genuine")]
        assert b.running.metric("qpq_federation_relay_total", peer="a.example",
                                result="refused") == 3
        assert b.running.metric("qpq_federation_relay_total", peer="a.example",
                                result="received_duplicate") == 2
        assert "claimed a sender of another domain" in b.running.log()
    finally:
        b.stop()


async def test_peer_relays_meet_the_rate_limit_and_quotas_of_local_senders(
        tmp_path: Path) -> None:
    _, b = make_sites(tmp_path, peer_rate_per_s=0.001, peer_burst=2)
    b.start()
    try:
        bob = await register(b, tmp_path, "bob")
        async with as_a(b, tmp_path) as link:
            answer = await link.call("relay", relays=[
                relay(10, "alice@a.example", b"1"), relay(11, "alice@a.example", b"2"),
                relay(12, "alice@a.example", b"3"), relay(13, "alice@a.example", b"4"),
                relay(14, "carol@a.example", b"5")])
            # Over the peer's budget: refused to be retried, and alice's later relays
            # wait behind it so her order holds.
            assert answer["results"] == ["delivered", "delivered", "rate_limited",
                                         "deferred", "rate_limited"]
        assert b.running.metric("qpq_rate_limit_hit_total", scope="federation") >= 2
        assert [p for _, p in await fetch(b, bob)] == [b"1", b"2"]
    finally:
        b.stop()


async def test_a_full_mailbox_refuses_peer_relays_as_it_does_local_ones(
        tmp_path: Path) -> None:
    _, b = make_sites(tmp_path, {"limits": {"mailbox_max_bytes": 2_000_000}})
    b.start()
    try:
        bob = await register(b, tmp_path, "bob")
        big = b"x" * 600_000
        async with as_a(b, tmp_path) as link:
            answer = await link.call("relay", relays=[
                relay(100 + i, "al@a.example", big) for i in range(4)])
        assert answer["results"] == ["delivered"] * 3 + ["quota_exceeded"]
        assert b.running.metric("qpq_quota_refused_total", kind="mailbox_bytes") == 1
        assert len(await fetch(b, bob)) == 3
    finally:
        b.stop()
