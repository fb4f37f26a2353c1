"""alice@a.example and bob@b.example talk with the real `qpq-client`: keys looked up
through the peer and verified against the peer's key-transparency log."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from qpq_server.client import ClientError, KtViolation
from qpq_server.devices import wrap_label
from qpq_server.devserver import await_until, running_server, wait_until
from tests.federation.conftest import Site, cli, started_sites


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Site, Site]]:
    """One pair for the module (each test has its own users and profiles, and none
    stops a site): a fresh pair per test cost ~2.6 CPU-s and ~3 s."""
    with started_sites(tmp_path_factory.mktemp("sites")) as pair:
        yield pair


def recv(site: Site, profile: Path, user: str) -> list[dict[str, object]]:
    done = cli(site.running, profile, "recv", user, "--wait", "2", "--json")
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def received(site: Site, profile: Path, user: str) -> list[dict[str, object]]:
    """What arrives for `user` on this device, waiting for the relay."""
    got: list[dict[str, object]] = []
    wait_until(lambda: got.extend(recv(site, profile, user)) or got, 30,
               f"a relayed message for {user} at {profile.name}")
    return got


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
        carol = cb.profile("carol").identity_public
        keys = await ca._recipient_keys(ca.profile("dave").session, "carol@b.example")
        assert [k.identity for k in keys] == [carol]
        assert keys[0].username == wrap_label("carol", carol)  # the name carol opens with
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
        await cb.register("ben", "pw")
    async with a.client(tmp_path) as ca:
        await ca.register("amy", "pw")
        await ca.register("cleo", "pw")
        ids = await ca.send_text("amy", ["cleo", "ben@b.example", "cleo@a.example"],
                                 "to both domains")
        assert len(ids) == 2  # cleo@a.example is cleo: one copy each
        assert [(m.sender, m.text) for m in await ca.receive("cleo")] == [
            ("amy", "to both domains")]
    async with b.client(tmp_path) as cb:
        got: list[tuple[str, str]] = []

        async def arrived() -> bool:
            got.extend((m.sender, m.text) for m in await cb.receive("ben", wait_s=1.0))
            return bool(got)

        await await_until(arrived, 30, "ben's copy")
        assert got == [("amy@a.example", "to both domains")]
        assert all(m.verified for m in await cb.receive("ben"))


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
    with running_server(tmp_path) as srv:
        profile = tmp_path / "p"
        assert cli(srv, profile, "register", "solo").returncode == 0
        for args in (("kt", "verify", "bob@b.example"),
                     ("send", "solo", "bob@b.example", "hi")):
            done = cli(srv, profile, *args)
            assert done.returncode != 0
            assert "does not federate" in done.stderr, done.stderr
            assert "Traceback" not in done.stderr


def test_every_device_of_a_remote_user_receives_and_own_devices_get_a_copy(
        sites: tuple[Site, Site], tmp_path: Path) -> None:
    from tests.server.test_e2e_attacks import link_device

    a, b = sites
    alice, bob1, bob2 = (tmp_path / n for n in ("alice", "bob1", "bob2"))
    assert cli(a.running, alice, "register", "ann").returncode == 0
    assert cli(b.running, bob1, "register", "bert").returncode == 0
    link_device(b.running, bob1, bob2, "bert")
    sent = cli(a.running, alice, "send", "ann", "bert@b.example", "to both devices")
    assert sent.returncode == 0, sent.stderr
    for device in (bob1, bob2):
        assert [(m["from"], m["text"]) for m in received(b, device, "bert")] == [
            ("ann@a.example", "to both devices")]
    reply = cli(b.running, bob2, "send", "bert", "ann@a.example", "from bob2")
    assert reply.returncode == 0, reply.stderr
    back: list[dict[str, object]] = []
    wait_until(lambda: back.extend(recv(a, alice, "ann")) or back, 30, "ann's reply")
    assert [(m["from"], m["text"]) for m in back] == [("bert@b.example", "from bob2")]
    copy = recv(b, bob1, "bert")  # bob2's message to another domain, on bob's other device
    assert [(m["from"], m["text"]) for m in copy] == [("bert", "from bob2")]
