"""Multi-device accounts end to end: a real server on loopback and real `qpq-client`
processes, one --profile per device (issue 12: a second device broke the account)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from qpq_server.client.e2e import public_bytes
from qpq_server.devices import link_keys
from qpq_server.identity import identity_change_message
from tests.helpers.server import RunningServer
from tests.server.conftest import client_factory_for
from tests.server.test_e2e_attacks import cli, db_exec, link_device


def texts(result: object) -> list[str]:
    stdout = getattr(result, "stdout", "")
    return [json.loads(line)["text"] for line in stdout.splitlines()]


def devices(srv: RunningServer, profile: Path, user: str) -> list[dict[str, object]]:
    listed = cli(srv, profile, "devices", user, "--json")
    assert listed.returncode == 0, listed.stderr
    return list(json.loads(listed.stdout)["devices"])


def test_two_devices_both_receive_and_unlink_stops_delivery(
        server: RunningServer, tmp_path: Path) -> None:
    alice, bob1, bob2 = (tmp_path / n for n in ("alice", "bob1", "bob2"))
    assert cli(server, alice, "register", "md_alice").returncode == 0
    assert cli(server, bob1, "register", "md_bob").returncode == 0
    second = link_device(server, bob1, bob2, "md_bob")

    listed = devices(server, bob1, "md_bob")
    assert len(listed) == 2 and [d["this_device"] for d in listed] == [True, False]
    assert listed[1]["id"] == second and listed[1]["endorsed_by"] == [listed[0]["id"]]
    assert len(str(listed[0]["fingerprint"]).replace(" ", "")) == 30
    assert [d["this_device"] for d in devices(server, bob2, "md_bob")] == [False, True]

    assert cli(server, alice, "send", "md_alice", "md_bob", "to both").returncode == 0
    one = cli(server, bob1, "recv", "md_bob", "--json")
    assert one.returncode == 0 and texts(one) == ["to both"], one.stderr
    two = cli(server, bob2, "recv", "md_bob", "--json")  # bob1's ack did not delete it
    assert two.returncode == 0 and texts(two) == ["to both"], two.stderr

    # what one device sends, the account's other device gets a copy of
    assert cli(server, bob2, "send", "md_bob", "md_alice", "sent from bob2").returncode == 0
    assert texts(cli(server, alice, "recv", "md_alice", "--json")) == ["sent from bob2"]
    mine = cli(server, bob1, "recv", "md_bob", "--json")
    assert mine.returncode == 0 and texts(mine) == ["sent from bob2"], mine.stderr
    assert texts(cli(server, bob2, "recv", "md_bob", "--json")) == []

    # a file reaches both devices: each holds its own reference to the attachment
    (tmp_path / "photo.bin").write_bytes(b"\x89photo" * 1000)
    assert cli(server, alice, "send-file", "md_alice", "md_bob",
               str(tmp_path / "photo.bin")).returncode == 0
    for device in (bob1, bob2):
        got = cli(server, device, "recv", "md_bob", "--json", "--out", str(device / "in"))
        assert got.returncode == 0, got.stderr
        assert (device / "in" / "photo.bin").read_bytes() == b"\x89photo" * 1000

    removed = cli(server, bob1, "unlink", "md_bob", second)
    assert removed.returncode == 0 and "1 device(s) left" in removed.stdout, removed.stderr
    assert [d["id"] for d in devices(server, bob1, "md_bob")] == [listed[0]["id"]]
    # bob's logged device set changed: alice's client stops until she accepts it
    blocked = cli(server, alice, "send", "md_alice", "md_bob", "after unlink")
    assert blocked.returncode == 2 and "identity_changed" in blocked.stderr
    assert cli(server, alice, "trust", "md_bob").returncode == 0
    assert cli(server, alice, "send", "md_alice", "md_bob", "after unlink").returncode == 0
    assert texts(cli(server, bob1, "recv", "md_bob", "--json")) == ["after unlink"]
    gone = cli(server, bob2, "login", "md_bob")  # its session ended; logging in says why
    assert gone.returncode == 1 and "device_unlinked" in gone.stderr, gone.stderr
    assert len(gone.stderr.strip().splitlines()) == 1


def test_a_new_device_without_a_link_code_is_refused_and_nothing_changes(
        server: RunningServer, tmp_path: Path) -> None:
    bob, other = tmp_path / "bob", tmp_path / "other"
    assert cli(server, bob, "register", "nl_bob").returncode == 0
    refused = cli(server, other, "login", "nl_bob")
    assert refused.returncode == 1 and "link_required" in refused.stderr
    assert "qpq-client link nl_bob" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert len(devices(server, bob, "nl_bob")) == 1
    assert cli(server, bob, "recv", "nl_bob").returncode == 0
    bad = cli(server, other, "login", "nl_bob", "--link-code", "not a code")
    assert bad.returncode == 64 and "12 letters" in bad.stderr
    wrong = cli(server, other, "login", "nl_bob", "--link-code", "ABCD-EFGH-JKMN")
    assert wrong.returncode == 1 and "link_required" in wrong.stderr
    too_long = cli(server, bob, "link", "nl_bob", "--wait", "601")
    assert too_long.returncode == 64 and "--wait" in too_long.stderr
    not_an_id = cli(server, bob, "unlink", "nl_bob", "phone")
    assert not_an_id.returncode == 64 and "device id" in not_an_id.stderr
    unknown = cli(server, bob, "unlink", "nl_bob", "00" * 8)
    assert unknown.returncode == 1 and "device_unlinked" in unknown.stderr


def test_a_device_nobody_approved_is_detected_by_the_others(
        server: RunningServer, tmp_path: Path) -> None:
    """Someone with the password and the database (or the server itself) plants a link
    approval and adds a device through the ordinary path: it is logged, so bob's device,
    which approved nothing, refuses loudly at login, recv and devices."""
    bob, planted = tmp_path / "bob", tmp_path / "planted"
    assert cli(server, bob, "register", "pl_bob").returncode == 0
    verifier, _ = link_keys("ABCDEFGHJKMN")
    db_exec(server, "INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (
        "link:pl_bob", json.dumps({"verifier": hashlib.sha256(verifier).hexdigest(),
                                   "expires_at": 4e9, "tries": 5, "by": "x"})))
    added = cli(server, planted, "login", "pl_bob", "--link-code", "ABCD-EFGH-JKMN")
    assert added.returncode == 0, added.stderr
    for command in (("recv", "pl_bob"), ("login", "pl_bob"), ("devices", "pl_bob")):
        seen = cli(server, bob, *command)
        assert seen.returncode == 2, (command, seen.stderr)
        assert "kt_unknown_device" in seen.stderr and "SECURITY" in seen.stderr
        assert "unlink pl_bob" in seen.stderr


async def test_a_device_that_rotates_its_key_with_a_handover_stays_known(
        server: RunningServer, tmp_path: Path) -> None:
    """`identity_proof` (the old key signs the new one) needs no link code: the other
    devices accept the new key because the old one, which they knew, signed it."""
    first, second = tmp_path / "first", tmp_path / "second"
    async with client_factory_for(server, first)() as c:
        await c.register("ho_bob", "pw")
        code = await c.link("ho_bob", "pw")
    async with client_factory_for(server, second)() as phone:
        await phone.login("ho_bob", "pw", link=code)
    async with client_factory_for(server, first)() as c:
        assert await c.wait_for_linked_device("ho_bob", 0) is not None  # vouches for it
    async with client_factory_for(server, second)() as phone:
        profile = phone.profile("ho_bob")
        old = profile.identity_public
        rotated = X25519PrivateKey.generate()
        new = public_bytes(rotated) + old[32:]
        answer = await phone.conn.call_raw({
            "op": "publish_keys", "session": profile.session, "identity_key": new,
            "identity_proof": profile.sign(identity_change_message("ho_bob", old, new)),
            "key_packages": []})
        assert answer["ok"], answer
        # the same without the handover: a device nobody approved
        stray = public_bytes(X25519PrivateKey.generate()) + old[32:]
        refused = await phone.conn.call_raw({
            "op": "publish_keys", "session": profile.session, "identity_key": stray,
            "key_packages": []})
        assert refused["error"]["code"] == "proof_required", refused
    async with client_factory_for(server, first)() as c:
        known = await c.check_own_devices(c.profile("ho_bob"))
        assert sorted(d.identity for d in known) == sorted(
            [c.profile("ho_bob").identity_public, new])


async def test_a_device_linked_by_another_gets_copies_of_what_this_one_sends(
        server: RunningServer, tmp_path: Path) -> None:
    """bob's laptop links his tablet; his phone, which has not looked since, learns the
    tablet from the laptop's endorsement when it next sends, and copies it."""
    phone, laptop, tablet = (tmp_path / n for n in ("phone", "laptop", "tablet"))
    async with client_factory_for(server, tmp_path / "alice")() as a:
        await a.register("lk_alice", "pw")
    async with client_factory_for(server, phone)() as p:
        await p.register("lk_bob", "pw")
        code = await p.link("lk_bob", "pw")
    async with client_factory_for(server, laptop)() as lap:
        await lap.login("lk_bob", "pw", link=code)
    async with client_factory_for(server, phone)() as p:
        assert await p.wait_for_linked_device("lk_bob", 0) is not None
    async with client_factory_for(server, laptop)() as lap:
        code = await lap.link("lk_bob", "pw")
    async with client_factory_for(server, tablet)() as tab:
        await tab.login("lk_bob", "pw", link=code)
    async with client_factory_for(server, laptop)() as lap:
        assert await lap.wait_for_linked_device("lk_bob", 0) is not None
    async with client_factory_for(server, phone)() as p:
        await p.send_text("lk_bob", ["lk_alice"], "from the phone")
    for device in (laptop, tablet):
        async with client_factory_for(server, device)() as c:
            assert [m.text for m in await c.receive("lk_bob")] == ["from the phone"]
