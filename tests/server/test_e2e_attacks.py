"""Attacks on end-to-end encryption by the server itself (or anyone holding the
database and its key, or one user's session), reproduced against a real server on
loopback: forged senders, replays, substituted prekeys, silent key changes."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import sqlcipher3
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from qpq_server.client import QpqClient
from qpq_server.client.e2e import RecipientKey, public_bytes, seal
from qpq_server.client.errors import ClientError, IdentityChanged, KtViolation
from qpq_server.client.profile import Profile
from qpq_server.identity import identity_change_message
from qpq_server.secrets import Secret
from qpq_server.storage.sqlcipher import key_pragma
from tests.helpers.server import BIN, RunningServer, running_server
from tests.server.conftest import ClientFactory, client_factory_for


def db_exec(srv: RunningServer, sql: str,
            args: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    """What a database-key holder can do to the live SQLCipher file."""
    conn = sqlcipher3.connect(str(srv.data_dir / "qpq.db"), timeout=10)
    try:
        conn.execute(key_pragma(Secret(srv.db_key)))
        rows = [tuple(r) for r in conn.execute(sql, args)]
        conn.commit()
        return rows
    finally:
        conn.close()


def insert_message(srv: RunningServer, recipient: str, sender: str, payload: bytes) -> None:
    db_exec(srv, "INSERT INTO messages(recipient, sender, payload, sent_at)"
            " VALUES (?, ?, ?, ?)", (recipient, sender, payload, time.time()))


def cli(srv: RunningServer, profile: Path, *args: str,
        password: str = "pw") -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QPQ_")}
    env.update(QPQ_AUTH_TOKEN=srv.auth_token, QPQ_PASSWORD=password)
    return subprocess.run(
        [str(BIN / "qpq-client"), "--server", srv.address, "--ca", str(srv.ca_cert),
         "--server-name", "localhost", "--profile", str(profile), *args],
        capture_output=True, text=True, timeout=60, env=env)


def link_device(srv: RunningServer, old: Path, new: Path, user: str) -> str:
    """`link` on the old device, `login --link-code` on the new one, as a user does;
    returns the new device's id."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QPQ_")}
    env.update(QPQ_AUTH_TOKEN=srv.auth_token, QPQ_PASSWORD="pw")
    linking = subprocess.Popen(
        [str(BIN / "qpq-client"), "--server", srv.address, "--ca", str(srv.ca_cert),
         "--server-name", "localhost", "--profile", str(old), "link", user, "--wait", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert linking.stdout is not None
        first = linking.stdout.readline()
        assert first.startswith(f"link code for {user}: "), first + linking.stderr.read()
        code = first.split(": ", 1)[1].strip()
        joined = cli(srv, new, "login", user, "--link-code", code)
        assert joined.returncode == 0, joined.stderr
        out, err = linking.communicate(timeout=60)
    finally:
        if linking.poll() is None:
            linking.kill()
            linking.wait()
    assert linking.returncode == 0 and "linked device" in out, out + err
    return out.rsplit("linked device ", 1)[1].split()[0]


def recipient_key(profile: Profile) -> RecipientKey:
    return RecipientKey(profile.username, profile.identity_public,
                        profile.current_prekey(time.time())[0])


async def test_forged_message_from_alice_is_rejected_and_marked(
        server: RunningServer, client: ClientFactory, tmp_path: Path) -> None:
    async with client() as c:
        await c.register("fa_alice", "pw")
        await c.register("fa_bob", "pw")
        bob = recipient_key(c.profile("fa_bob"))
        alice_identity = c.profile("fa_alice").identity_public
    mallory = X25519PrivateKey.generate()
    # 1: sealed with the attacker's own identity, claiming to be alice
    own = seal({"type": "text", "text": "wire the money"}, "fa_alice", mallory,
               public_bytes(mallory) + alice_identity[32:], [bob], int(time.time() * 1000))
    # 2: naming alice's real identity, but without her private key
    claimed = seal({"type": "text", "text": "wire it now"}, "fa_alice", mallory,
                   alice_identity, [bob], int(time.time() * 1000))
    insert_message(server, "fa_bob", "fa_alice", own)
    insert_message(server, "fa_bob", "fa_alice", claimed)

    result = cli(server, tmp_path / "profiles", "recv", "fa_bob", "--json")
    assert result.returncode == 2, result.stdout + result.stderr
    entries = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(e["verified"], e["error"]) for e in entries] == [
        (False, "forged_sender"), (False, "forged_sender")]
    assert "wire" not in result.stdout
    assert "SECURITY: forged_sender" in result.stderr

    async with client() as c:  # the genuine alice still gets through, verified
        await c.send_text("fa_alice", ["fa_bob"], "the real alice")
        got = await c.receive("fa_bob")
        assert [(m.text, m.verified) for m in got] == [("the real alice", True)]


async def test_reinserted_envelope_is_shown_once(server: RunningServer,
                                                 client: ClientFactory) -> None:
    async with client() as c:
        await c.register("rp_alice", "pw")
        await c.register("rp_bob", "pw")
        await c.send_text("rp_alice", ["rp_bob"], "only once")
        (row,) = db_exec(server, "SELECT recipient, sender, payload, sent_at FROM messages"
                         " WHERE recipient = 'rp_bob'")
        insert_message(server, "rp_bob", "rp_alice", bytes(row[2]))  # same batch
        assert [m.text for m in await c.receive("rp_bob")] == ["only once"]
        insert_message(server, "rp_bob", "rp_alice", bytes(row[2]))  # after the ack
        assert await c.receive("rp_bob") == []  # dropped, not even shown as an error
        assert c.replays_dropped == 2
        await c.send_text("rp_alice", ["rp_bob"], "a new one")
        assert [m.text for m in await c.receive("rp_bob")] == ["a new one"]

    # the replay cache survives the process: a fresh client on the same profile drops it
    async with client() as c:
        insert_message(server, "rp_bob", "rp_alice", bytes(row[2]))
        assert await c.receive("rp_bob") == []


async def test_a_session_alone_cannot_replace_the_identity_key(
        server: RunningServer, client: ClientFactory, tmp_path: Path) -> None:
    async with client() as c:
        await c.register("sk_victim", "pw")
        victim = c.profile("sk_victim")
        session = victim.session
        old = victim.identity_public
    stolen = X25519PrivateKey.generate()
    new = public_bytes(stolen) + old[32:]
    async with client() as thief:  # a new connection that holds only the session
        answer = await thief.conn.call_raw({"op": "publish_keys", "session": session,
                                            "identity_key": new, "key_packages": []})
        assert answer["error"]["code"] == "proof_required", answer
        bad_proof = victim.sign(identity_change_message("sk_victim", new, new))
        answer = await thief.conn.call_raw({"op": "publish_keys", "session": session,
                                            "identity_key": new, "identity_proof": bad_proof,
                                            "key_packages": []})
        assert answer["error"]["code"] == "proof_required", answer
        assert (await thief.conn.call("kt_lookup", username="sk_victim"))[
            "identity_key"] == old
        # the previous identity may hand over to a new one (device key rotation)
        proof = victim.sign(identity_change_message("sk_victim", old, new))
        answer = await thief.conn.call_raw({"op": "publish_keys", "session": session,
                                            "identity_key": new, "identity_proof": proof,
                                            "key_packages": []})
        assert answer["ok"], answer
        assert (await thief.conn.call("kt_lookup", username="sk_victim"))[
            "identity_key"] == new


async def test_key_change_stops_send_until_trust_and_safety_numbers_match(
        server: RunningServer, client: ClientFactory, tmp_path: Path) -> None:
    alice_dir, bob_dir, bob_new_dir = (tmp_path / n for n in ("alice", "bob", "bob-new"))
    assert cli(server, alice_dir, "register", "kc_alice").returncode == 0
    assert cli(server, bob_dir, "register", "kc_bob").returncode == 0
    assert cli(server, alice_dir, "send", "kc_alice", "kc_bob", "hi").returncode == 0

    a_side = cli(server, alice_dir, "fingerprint", "kc_bob", "--json")
    b_side = cli(server, bob_dir, "fingerprint", "kc_alice", "--json")
    assert a_side.returncode == 0 and b_side.returncode == 0, a_side.stderr + b_side.stderr
    number = json.loads(a_side.stdout)["safety_number"]
    assert number == json.loads(b_side.stdout)["safety_number"]
    assert len(number.replace(" ", "")) == 60 and number.replace(" ", "").isdigit()

    # bob links a new device (a code from the old one, and the password): the device
    # set his account logs changes, and so does the safety number
    link_device(server, bob_dir, bob_new_dir, "kc_bob")
    blocked = cli(server, alice_dir, "send", "kc_alice", "kc_bob", "still there?")
    assert blocked.returncode == 2, blocked.stdout + blocked.stderr
    assert "identity_changed" in blocked.stderr and "trust kc_bob" in blocked.stderr
    changed = cli(server, alice_dir, "fingerprint", "kc_bob")
    assert changed.returncode == 2 and "differs from the one you pinned" in changed.stdout

    # the old device approved the new one: it logs in as before
    assert cli(server, bob_dir, "login", "kc_bob").returncode == 0

    new_a = json.loads(cli(server, alice_dir, "fingerprint", "kc_bob", "--json").stdout)
    new_b = json.loads(cli(server, bob_new_dir, "fingerprint", "kc_alice", "--json").stdout)
    assert new_a["safety_number"] == new_b["safety_number"] != number
    trusted = cli(server, alice_dir, "trust", "kc_bob", "--json")
    assert trusted.returncode == 0 and json.loads(trusted.stdout)["previous"]
    assert cli(server, alice_dir, "send", "kc_alice", "kc_bob", "welcome back").returncode == 0
    got = cli(server, bob_new_dir, "recv", "kc_bob", "--json")
    entries = [json.loads(line) for line in got.stdout.splitlines()]
    # "hi" was sent before the new device existed: only the old one has a copy
    assert [(e["text"], e["verified"]) for e in entries] == [("welcome back", True)]
    old = cli(server, bob_dir, "recv", "kc_bob", "--json")
    assert [json.loads(line)["text"] for line in old.stdout.splitlines()] == [
        "hi", "welcome back"] and old.returncode == 0


async def test_messages_from_a_changed_key_wait_for_trust(
        server: RunningServer, client: ClientFactory, tmp_path: Path) -> None:
    async with client() as c:
        await c.register("wt_alice", "pw")
        await c.register("wt_bob", "pw")
        await c.send_text("wt_alice", ["wt_bob"], "first")
        assert [m.text for m in await c.receive("wt_bob")] == ["first"]  # pins alice
    async with client() as c:
        code = await c.link("wt_alice", "pw")
    async with client_factory_for(server, tmp_path / "alice-new")() as fresh:
        await fresh.login("wt_alice", "pw", link=code)  # alice's new device
        await fresh.send_text("wt_alice", ["wt_bob"], "from my new phone")
    async with client() as c:
        held = await c.receive("wt_bob")
        assert [(m.verified, m.error) for m in held] == [(False, "identity_changed")]
        assert [m.text for m in await c.receive("wt_bob")] == [held[0].text]  # still queued
        found = await c.kt.lookup("wt_alice")
        c.pins.pin("wt_alice", found.identity_key)  # what `trust` does
        assert [m.text for m in await c.receive("wt_bob")] == ["from my new phone"]


async def test_a_substituted_signed_prekey_stops_the_sender(
        server: RunningServer, client: ClientFactory) -> None:
    async with client() as c:
        await c.register("sp_alice", "pw")
        await c.register("sp_bob", "pw")
        attacker = public_bytes(X25519PrivateKey.generate())
        db_exec(server, "UPDATE meta SET value = ? WHERE key = 'spk:sp_bob'",
                ((attacker + bytes(64)).hex(),))
        with pytest.raises(KtViolation) as err:
            await c.send_text("sp_alice", ["sp_bob"], "to the attacker?")
        assert err.value.code == "bad_prekey_signature"


async def test_key_packages_cannot_be_drained_and_running_low_is_counted(
        tmp_path: Path) -> None:
    overrides = {"rate_limit": {"key_fetch_burst": 12, "key_fetch_rate_per_s": 0.01,
                                "one_time_key_burst": 3, "account_burst": 1000,
                                "address_burst": 1000}}
    with running_server(tmp_path, overrides=overrides) as srv:
        async with srv.connect() as conn:
            c = QpqClient(conn, tmp_path / "profiles")
            for name in ("dr_owner", "dr_thief", "dr_friend"):
                await c.register(name, "pw")
            thief = c.profile("dr_thief").session
            answers = [await conn.call("get_keys", session=thief, username="dr_owner")
                       for _ in range(10)]
            packages = [a["key_package"] for a in answers]
            assert all(packages[:3]) and packages[3:] == [None] * 7
            assert all(a["signed_prekey"] and a["signed_prekey_signature"] for a in answers)
            refused = [await conn.call_raw({"op": "get_keys", "session": thief,
                                            "username": "dr_friend"}) for _ in range(3)]
            assert refused[-1]["error"]["code"] == "rate_limited"
            assert "key fetches" in refused[-1]["error"]["message"]
            # the owner still has packages for everyone else
            assert (await conn.call("publish_keys", session=c.profile("dr_owner").session,
                                    key_packages=[]))["key_packages"] == 17
            assert srv.metric("qpq_rate_limit_hit_total", scope="key_fetch") >= 1

            # draining takes many accounts (3 packages each), and shows in the metric
            assert srv.metric("qpq_key_packages_low_total") == 0
            for i in range(7):
                await c.register(f"dr_sybil{i}", "pw")
                sybil = c.profile(f"dr_sybil{i}").session
                for _ in range(3):
                    await conn.call("get_keys", session=sybil, username="dr_owner")
            assert srv.metric("qpq_key_packages_low_total") >= 5
            # with none left, senders use the signed prekey (never the bare identity)
            friend = c.profile("dr_friend").session
            last = await conn.call("get_keys", session=friend, username="dr_owner")
            assert last["key_package"] is None and last["signed_prekey"]
            await c.send_text("dr_friend", ["dr_owner"], "no packages left")
            assert [m.text for m in await c.receive("dr_owner")] == ["no packages left"]


async def test_a_session_cannot_publish_a_prekey_the_identity_did_not_sign(
        server: RunningServer, client: ClientFactory) -> None:
    async with client() as c:
        await c.register("fk_user", "pw")
        session = c.profile("fk_user").session
        with pytest.raises(ClientError) as err:
            await c.conn.call("publish_keys", session=session, key_packages=[],
                              signed_prekey=b"\x02" * 32, signed_prekey_signature=b"\x03" * 64)
        assert err.value.code == "bad_request" and "signature" in err.value.message
        with pytest.raises(ClientError) as err:  # one without the other
            await c.conn.call("publish_keys", session=session, key_packages=[],
                              signed_prekey=b"\x02" * 32)
        assert err.value.code == "bad_request"


def test_identity_changed_is_a_verification_failure() -> None:
    assert issubclass(IdentityChanged, KtViolation)


async def test_an_old_key_served_as_current_is_detected(
        server: RunningServer, client: ClientFactory, tmp_path: Path) -> None:
    """The old key is still in the append-only log, so an inclusion proof alone would
    pass: the signed key map is what says it is no longer bob's key."""
    async with client() as c:
        await c.register("st_alice", "pw")
        await c.register("st_bob", "pw")
        old = c.profile("st_bob").identity_public
    (old_prekey,) = db_exec(server, "SELECT value FROM meta WHERE key = 'spk:st_bob'")
    async with client() as c:
        code = await c.link("st_bob", "pw")
    async with client_factory_for(server, tmp_path / "bob-new")() as fresh:
        await fresh.login("st_bob", "pw", link=code)  # bob's new device: a new set, logged
    db_exec(server, "UPDATE accounts SET identity_key = ? WHERE username = 'st_bob'", (old,))
    db_exec(server, "UPDATE meta SET value = ? WHERE key = 'spk:st_bob'", old_prekey)
    async with client() as c:  # alice never pinned bob: only the log can tell
        with pytest.raises(KtViolation) as err:
            await c.send_text("st_alice", ["st_bob"], "to a key bob retired")
        assert err.value.code == "kt_not_current"
        with pytest.raises(KtViolation):
            await c.kt.lookup("st_bob")


async def test_fingerprint_and_trust_bad_input_get_clear_errors(
        server: RunningServer, client: ClientFactory, tmp_path: Path) -> None:
    async with client() as c:  # two local users in one profile: which one is "me"?
        await c.register("bi_one", "pw")
        await c.register("bi_two", "pw")
    profiles = tmp_path / "profiles"
    ambiguous = cli(server, profiles, "fingerprint", "bi_one")
    assert ambiguous.returncode == 64 and "--as" in ambiguous.stderr
    assert len(ambiguous.stderr.strip().splitlines()) == 1
    chosen = cli(server, profiles, "fingerprint", "bi_one", "--as", "bi_two", "--json")
    assert chosen.returncode == 0 and json.loads(chosen.stdout)["matches_pin"] is True
    unknown = cli(server, profiles, "trust", "bi_nobody")
    assert unknown.returncode == 1 and "unknown_user" in unknown.stderr
    no_such_me = cli(server, profiles, "fingerprint", "bi_one", "--as", "bi_ghost")
    assert no_such_me.returncode == 64 and "bi_ghost" in no_such_me.stderr
