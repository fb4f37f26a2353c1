"""alice@a.example and bob@b.example talk with the real `qpq-client`: keys looked up
through the peer and verified against the peer's key-transparency log."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qpq_server.client import ClientError, KtViolation
from qpq_server.devserver import await_until, wait_until
from tests.federation.conftest import Site, cli


def recv(site: Site, profile: Path, user: str) -> list[dict[str, object]]:
    done = cli(site.running, profile, "recv", user, "--wait", "2", "--json")
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def test_alice_sends_to_bob_at_the_peer_and_bob_replies(sites: tuple[Site, Site],
                                                        tmp_path: Path) -> None:
    a, b = sites
    pa, pb = tmp_path / "alice-profile", tmp_path / "bob-profile"
    assert cli(a.running, pa, "register", "alice").returncode == 0
    assert cli(b.running, pb, "register", "bob").returncode == 0
    sent = cli(a.running, pa, "send", "alice", "bob@b.example", "hello from a")
    assert sent.returncode == 0, sent.stderr
    got: list[dict[str, object]] = []
    wait_until(lambda: got.extend(recv(b, pb, "bob")) or got, 30, "bob's message")
    assert [(m["from"], m["text"]) for m in got] == [("alice@a.example", "hello from a")]
    reply = cli(b.running, pb, "send", "bob", "alice@a.example", "hi alice")
    assert reply.returncode == 0, reply.stderr
    back: list[dict[str, object]] = []
    wait_until(lambda: back.extend(recv(a, pa, "alice")) or back, 30, "alice's reply")
    assert [(m["from"], m["text"]) for m in back] == [("bob@b.example", "hi alice")]
    verified = cli(a.running, pa, "kt", "verify", "bob@b.example")
    assert verified.returncode == 0, verified.stderr


async def test_a_remote_key_is_verified_against_the_peers_log(
        sites: tuple[Site, Site], tmp_path: Path) -> None:
    a, b = sites
    async with b.client(tmp_path) as cb:
        await cb.register("carol", "pw")
    async with a.client(tmp_path) as ca:
        await ca.register("dave", "pw")
        key = await ca._recipient_key(ca.profile("dave").session, "carol@b.example")
        assert key.identity == cb.profile("carol").identity_public
        assert key.username == "carol"  # the name carol's own envelopes use
        # The peer's head was pinned apart from our own server's.
        pins = sorted(p.name for p in (tmp_path / "client-a.example" / "kt").iterdir())
        assert any("b.example" in p for p in pins) and len(pins) == 2
        # A proof that does not fit carol's key is refused, as for a local user.
        bundle = await ca.conn.call("get_keys", session=ca.profile("dave").session,
                                    username="carol@b.example")
        with pytest.raises(KtViolation):
            await ca._kt_for("b.example").verify_key("carol", b"\x01" * 32, bundle["kt"])


async def test_one_send_to_local_and_remote_users_reaches_both_as_the_right_sender(
        sites: tuple[Site, Site], tmp_path: Path) -> None:
    a, b = sites
    async with b.client(tmp_path) as cb:
        await cb.register("bob", "pw")
    async with a.client(tmp_path) as ca:
        await ca.register("alice", "pw")
        await ca.register("carol", "pw")
        ids = await ca.send_text("alice", ["carol", "bob@b.example", "carol@a.example"],
                                 "to both domains")
        assert len(ids) == 2  # carol@a.example is carol: one copy each
        assert [(m.sender, m.text) for m in await ca.receive("carol")] == [
            ("alice", "to both domains")]
    async with b.client(tmp_path) as cb:
        got: list[tuple[str, str]] = []

        async def arrived() -> bool:
            got.extend((m.sender, m.text) for m in await cb.receive("bob", wait_s=1.0))
            return bool(got)

        await await_until(arrived, 30, "bob's copy")
        assert got == [("alice@a.example", "to both domains")]
        assert all(m.verified for m in await cb.receive("bob"))


async def test_unknown_domains_and_attachments_to_other_domains_are_refused_clearly(
        sites: tuple[Site, Site], tmp_path: Path) -> None:
    a, _ = sites
    async with a.client(tmp_path) as ca:
        await ca.register("erin", "pw")
        session = ca.profile("erin").session
        for recipients, code, words in (
                (["x@c.example"], "unknown_user", "not a federation peer"),
                (["x@not a domain"], "bad_request", "USER@DOMAIN"),
                (["bob@b.example"], "bad_request", "attachments cannot be relayed")):
            extra = {"blobs": [b"\x01" * 32]} if "attachments" in words else {}
            with pytest.raises(ClientError) as err:
                await ca.conn.call("enqueue", session=session, recipients=recipients,
                                   payload=b"x", **extra)
            assert err.value.code == code and words in err.value.message, err.value


def test_user_at_domain_on_a_server_that_does_not_federate_is_a_clear_error(
        tmp_path: Path) -> None:
    from qpq_server.devserver import running_server

    with running_server(tmp_path) as srv:
        profile = tmp_path / "p"
        assert cli(srv, profile, "register", "solo").returncode == 0
        for args in (("kt", "verify", "bob@b.example"),
                     ("send", "solo", "bob@b.example", "hi")):
            done = cli(srv, profile, *args)
            assert done.returncode != 0
            assert "does not federate" in done.stderr, done.stderr
            assert "Traceback" not in done.stderr
