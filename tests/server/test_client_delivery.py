"""`qpq-client` never loses a message (issue 12), against a real server on loopback with
real client processes: acks only after the message is out, one profile shared by two
processes, a poisoned attachment, undecryptable rows, a second and a re-initialised
server, terminal spoofing, and the command line's own hygiene."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from qpq_server.client import QpqClient
from qpq_server.client.files import encrypt_stream
from qpq_server.client.inbox import DeliveryLog
from qpq_server.client.profile import Profile
from qpq_server.devserver import BIN, RunningServer, running_server, wait_until
from qpq_server.tls import write_self_signed
from tests.server.conftest import ClientFactory
from tests.server.test_e2e_attacks import db_exec, insert_message


def env_for(srv: RunningServer | None, password: str | None = "pw",
            **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QPQ_")}
    if srv is not None:
        env["QPQ_AUTH_TOKEN"] = srv.auth_token
    if password is not None:
        env["QPQ_PASSWORD"] = password
    env.update(extra)
    return env


def base(srv: RunningServer, profile: Path) -> list[str]:
    return [str(BIN / "qpq-client"), "--server", srv.address, "--ca", str(srv.ca_cert),
            "--server-name", "localhost", "--profile", str(profile)]


def cli(srv: RunningServer, profile: Path, *args: str, password: str | None = "pw",
        stdin: str | None = None, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*base(srv, profile), *args], capture_output=True, text=True,
                          timeout=60, env=env_for(srv, password, **extra), input=stdin)


def inbox(srv: RunningServer, profile: Path, user: str) -> DeliveryLog:
    """The CLI's delivery log: per address and the server's key-transparency key."""
    pin = profile / "kt" / f"{srv.address.replace(':', '_')}.json"
    key = json.loads(pin.read_text())["public_key"]
    return DeliveryLog(profile, f"{srv.address}#{key[:16]}", user)


def rows(result: subprocess.CompletedProcess[str]) -> list[dict[str, object]]:
    return [json.loads(line) for line in result.stdout.splitlines()]


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def register(srv: RunningServer, profile: Path, *users: str) -> None:
    for user in users:
        ok(cli(srv, profile, "register", user))


def test_recv_to_a_full_disk_loses_nothing(server: RunningServer, tmp_path: Path) -> None:
    prof = tmp_path / "p"
    register(server, prof, "df_a", "df_b")
    ok(cli(server, prof, "send", "df_a", "df_b", "first"))
    ok(cli(server, prof, "send", "df_a", "df_b", "second"))
    with open("/dev/full", "w") as full:
        lost = subprocess.run([*base(server, prof), "recv", "df_b"], stdout=full,
                              stderr=subprocess.PIPE, text=True, timeout=60,
                              env=env_for(server))
    assert lost.returncode == 1, lost.stderr
    assert lost.stderr.count("\n") == 1 and "Traceback" not in lost.stderr
    assert "No space left on device" in lost.stderr
    again = ok(cli(server, prof, "recv", "df_b", "--json"))
    assert [r["text"] for r in rows(again)] == ["first", "second"]
    assert rows(ok(cli(server, prof, "recv", "df_b", "--json"))) == []


def test_an_unencodable_message_is_shown_escaped_not_lost(
        server: RunningServer, tmp_path: Path) -> None:
    prof = tmp_path / "p"
    register(server, prof, "enc_a", "enc_b")
    ok(cli(server, prof, "send", "enc_a", "enc_b", "caf\u00e9 \u2713"))
    shown = ok(cli(server, prof, "recv", "enc_b", PYTHONIOENCODING="ascii"))
    assert "enc_a: caf\\xe9 \\u2713" in shown.stdout
    assert ok(cli(server, prof, "recv", "enc_b")).stdout == ""


def test_a_shown_message_whose_ack_was_lost_is_shown_once(
        server: RunningServer, client: ClientFactory, tmp_path: Path) -> None:
    prof = tmp_path / "profiles"  # the `client` fixture's profile dir
    register(server, prof, "ss_a", "ss_b")
    ok(cli(server, prof, "send", "ss_a", "ss_b", "shown before the crash"))
    (msg_id,) = db_exec(server, "SELECT id FROM messages WHERE recipient = 'ss_b'")[0]
    # As if a recv had shown it and died before its ack reached the server.
    log = inbox(server, prof, "ss_b")
    with log.delivering():
        log.add(int(str(msg_id)))
    again = ok(cli(server, prof, "recv", "ss_b"))
    assert again.stdout == ""
    assert "dropped 1 message(s) already received once" in again.stderr
    assert db_exec(server, "SELECT id FROM messages WHERE recipient = 'ss_b'") == []


def test_two_recv_at_once_show_a_message_once(server: RunningServer, tmp_path: Path) -> None:
    prof = tmp_path / "p"
    register(server, prof, "tw_a", "tw_b")
    waiters = server.metric("qpq_delivery_waiters")
    parked = [subprocess.Popen([*base(server, prof), "recv", "tw_b", "--wait", "20"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env_for(server)) for _ in range(2)]
    try:
        wait_until(lambda: server.metric("qpq_delivery_waiters") >= waiters + 2, 30,
                   "both recv parked")
        ok(cli(server, prof, "send", "tw_a", "tw_b", "just once"))
        outs = [p.communicate(timeout=60) for p in parked]
    finally:
        for p in parked:
            p.kill()
            p.wait()
    assert [p.returncode for p in parked] == [0, 0], outs
    assert "".join(out for out, _ in outs).count("just once") == 1


def test_a_parked_recv_keeps_the_keys_a_login_in_another_process_added(
        server: RunningServer, tmp_path: Path) -> None:
    prof = tmp_path / "p"
    register(server, prof, "pk_a", "pk_b")
    waiters = server.metric("qpq_delivery_waiters")
    parked = subprocess.Popen([*base(server, prof), "recv", "pk_b", "--wait", "30", "--json"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env_for(server))
    try:
        wait_until(lambda: server.metric("qpq_delivery_waiters") > waiters, 30,
                   "recv parked")
        # bob's one-time packages run out; a login in another terminal publishes new ones
        db_exec(server, "DELETE FROM key_packages WHERE username = 'pk_b'")
        ok(cli(server, prof, "login", "pk_b"))
        ok(cli(server, prof, "send", "pk_a", "pk_b", "to a key the login added"))
        out, err = parked.communicate(timeout=60)
    finally:
        parked.kill()
        parked.wait()
    assert parked.returncode == 0, out + err
    assert [(r["text"], r["verified"]) for r in map(json.loads, out.splitlines())] == [
        ("to a key the login added", True)]
    # the parked process did not write back the keys it loaded before the login
    ok(cli(server, prof, "send", "pk_a", "pk_b", "to another new key"))
    assert [r["text"] for r in rows(ok(cli(server, prof, "recv", "pk_b", "--json")))] == [
        "to another new key"]


def _blob_of(srv: RunningServer, sender: str) -> Path:
    for path in (srv.data_dir / "blobs").rglob("*"):
        if path.is_file() and not path.name.endswith(".meta") and path.parent.name != "tmp":
            meta = path.with_name(path.name + ".meta")
            if f'"{sender}"' in meta.read_text():
                return path
    raise AssertionError(f"no blob uploaded by {sender}")


def test_a_poisoned_attachment_is_reported_recorded_and_acked_and_the_rest_flows(
        server: RunningServer, tmp_path: Path) -> None:
    prof, out = tmp_path / "p", tmp_path / "in"
    register(server, prof, "po_a", "po_b")
    doc = tmp_path / "gone.txt"
    doc.write_text("the operator lost this blob")
    ok(cli(server, prof, "send-file", "po_a", "po_b", str(doc)))
    _blob_of(server, "po_a").unlink()
    ok(cli(server, prof, "send", "po_a", "po_b", "after the poisoned one"))
    got = cli(server, prof, "recv", "po_b", "--json", "--out", str(out))
    assert got.returncode == 1, got.stdout + got.stderr
    failed, good = rows(got)
    assert failed["error"] == "attachment_failed" and "not_found" in str(failed["detail"])
    assert isinstance(failed["id"], int) and failed["verified"] is True
    assert good["text"] == "after the poisoned one" and "error" not in good
    assert "its attachment cannot be fetched" in got.stderr
    (record,) = inbox(server, prof, "po_b").failures()
    assert record["id"] == failed["id"] and record["error"] == "not_found"
    assert not out.exists() or list(out.iterdir()) == []
    assert rows(ok(cli(server, prof, "recv", "po_b", "--json"))) == []  # acked


def test_undecryptable_is_never_silent(server: RunningServer, tmp_path: Path) -> None:
    prof = tmp_path / "p"
    register(server, prof, "ud_a", "ud_b")
    insert_message(server, "ud_b", "ud_a", b"\x93not an envelope")
    ok(cli(server, prof, "send", "ud_a", "ud_b", "a good one"))
    got = cli(server, prof, "recv", "ud_b", "--json")
    assert got.returncode == 2, got.stdout + got.stderr
    bad, good = rows(got)
    assert bad["error"] == "undecryptable" and bad["verified"] is False
    assert isinstance(bad["id"], int) and "text" not in bad
    assert good["text"] == "a good one"
    assert f"message {bad['id']} claiming to be from ud_a rejected" in got.stderr
    human = cli(server, prof, "recv", "ud_b")
    assert human.returncode == 0 and human.stdout == ""  # acked once shown


async def test_sender_text_and_file_names_cannot_spoof_or_escape(
        server: RunningServer, client: ClientFactory, tmp_path: Path) -> None:
    prof, out = tmp_path / "profiles", tmp_path / "in" / "box"
    register(server, prof, "sp_a", "sp_b")
    evil_text = ("\x1b[2J\x1b]0;owned\x07hi \u202eevil\u202c\x9b31m"
                 "\n[2026-01-01 00:00:00] sp_c: fake line\r\nend")
    ok(cli(server, prof, "send", "sp_a", "sp_b", evil_text))
    names = ["../../escape.txt", "/tmp/abs.txt", "nul\x00byte.txt", "..",
             "inv\u202egpj.exe", "\x1b[31mred.txt", "x" * 300]
    async with client() as c:
        for name in names:
            await _send_named_file(c, "sp_a", "sp_b", name, tmp_path)
    got = ok(cli(server, prof, "recv", "sp_b", "--out", str(out)))
    text = got.stdout
    assert "\x1b" not in text and "\u202e" not in text and "\x9b" not in text
    assert "\\x1b[2J" in text and "\\u202e" in text and "\\x9b31m" in text
    lines = text.splitlines()
    assert not any(line.startswith("[2026-01-01") for line in lines)
    assert "    [2026-01-01 00:00:00] sp_c: fake line" in lines
    saved = sorted(p.name for p in out.iterdir())
    assert len(saved) == len(names), saved
    assert all("/" not in n and "\x00" not in n and "\u202e" not in n
               and not n.startswith(".") and len(n.encode()) <= 200 for n in saved)
    assert "escape.txt" in saved and "abs.txt" in saved and "nul_byte.txt" in saved
    assert not (tmp_path / "escape.txt").exists() and not Path("/tmp/abs.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["profiles", "in", "payload"])


async def _send_named_file(c: QpqClient, sender: str, to: str, name: str,
                           tmp_path: Path, key: bytes | None = None) -> None:
    """A file message with a sender-chosen name (the CLI always sends the real one) and,
    to poison it, a key of the sender's choosing."""
    source = tmp_path / "payload"
    source.write_bytes(b"payload")
    if not c.has_session(sender):
        await c.login(sender, "pw")
    with source.open("rb") as src, tempfile.TemporaryFile() as sealed:
        encrypted = encrypt_stream(src, sealed)
        sealed.seek(0)
        await c.conn.put_blob(c.profile(sender).state().session or "", sealed,
                              encrypted.size, encrypted.sha256)
    await c.send(sender, [to], {"type": "file", "name": name, "size": 7,
                                "blob": encrypted.sha256, "blob_size": encrypted.size,
                                "key": key or encrypted.key, "text": "[file]"},
                 blobs=[encrypted.sha256])


async def test_attachments_that_cannot_open_are_failures_not_blockers(
        server: RunningServer, client: ClientFactory, tmp_path: Path) -> None:
    prof, out = tmp_path / "profiles", tmp_path / "in"
    register(server, prof, "pm_a", "pm_b")
    async with client() as c:
        await _send_named_file(c, "pm_a", "pm_b", "wrong-key.bin", tmp_path,
                               key=b"\x01" * 32)
        await c.send("pm_a", ["pm_b"], {"type": "file", "name": "no-blob.bin",
                                        "text": "[file]"})
        await _send_named_file(c, "pm_a", "pm_b", "short-key.bin", tmp_path, key=b"k")
        await c.send("pm_a", ["pm_b"], {"type": "file", "name": "x", "blob": b"\x02" * 32,
                                        "key": b"\x03" * 32, "size": b"not an int"})
        await c.send_text("pm_a", ["pm_b"], "still flows")
    got = cli(server, prof, "recv", "pm_b", "--json", "--out", str(out))
    assert got.returncode == 1, got.stdout + got.stderr
    assert [(r.get("error"), str(r.get("detail", "")).split(":")[0]) for r in rows(got)] == [
        ("attachment_failed", "bad_attachment"), ("attachment_failed", "bad_message"),
        ("attachment_failed", "bad_message"), ("attachment_failed", "not_found"),
        (None, "")]
    assert not out.exists() or list(out.iterdir()) == []  # no half-decrypted file left
    assert len(inbox(server, prof, "pm_b").failures()) == 4
    assert rows(ok(cli(server, prof, "recv", "pm_b", "--json"))) == []


async def test_a_garbage_tree_head_rejects_its_message_not_the_inbox(
        server: RunningServer, client: ClientFactory, tmp_path: Path) -> None:
    prof = tmp_path / "profiles"
    register(server, prof, "gh_a", "gh_b")
    async with client() as c:
        c.kt.pinned_head = lambda: None  # type: ignore[method-assign]  # send ours as is
        await c.send("gh_a", ["gh_b"], {"type": "text", "text": "poisoned head",
                                        "kt_head": {"size": 1, "root": b"\x00" * 32,
                                                    "timestamp_ms": 1,
                                                    "signature": b"x" * 64,
                                                    "map_root": b"\x00" * 32}})
        await c.send_text("gh_a", ["gh_b"], "after it")
    got = cli(server, prof, "recv", "gh_b", "--json")
    assert got.returncode == 2, got.stdout + got.stderr
    assert [(r["verified"], r.get("error"), r.get("text")) for r in rows(got)] == [
        (False, "bad_gossip", None), (True, None, "after it")]
    assert rows(ok(cli(server, prof, "recv", "gh_b", "--json"))) == []


def test_one_profile_on_two_servers_keeps_both(server: RunningServer, tmp_path: Path) -> None:
    prof = tmp_path / "p"
    register(server, prof, "ts_a", "ts_b")
    with running_server(tmp_path / "second",
                        overrides={"rate_limit": {"enabled": False}}) as other:
        registered = ok(cli(other, prof, "register", "ts_a"))
        assert "registered ts_a" in registered.stdout
        assert f"this profile has not been used with {other.address}" in registered.stderr
        ok(cli(other, prof, "register", "ts_b"))
        ok(cli(other, prof, "send", "ts_b", "ts_a", "on the second server"))
        assert [r["text"] for r in rows(ok(cli(other, prof, "recv", "ts_a", "--json")))] == [
            "on the second server"]
    # the first server's session and keys are untouched: no login needed, no new key
    ok(cli(server, prof, "send", "ts_b", "ts_a", "on the first server"))
    first = ok(cli(server, prof, "recv", "ts_a", "--json", password=None))
    assert [r["text"] for r in rows(first)] == ["on the first server"]


def test_a_reinitialised_server_is_named_clearly(tmp_path: Path) -> None:
    prof = tmp_path / "p"
    with running_server(tmp_path / "old") as old:
        register(old, prof, "ri_a", "ri_b")
        ok(cli(old, prof, "send", "ri_b", "ri_a", "on the old server"))
        ok(cli(old, prof, "recv", "ri_a"))  # its message id is in the seen-set
        listen = old.address
    with running_server(tmp_path / "new", overrides={"server": {"listen": listen}}) as new:
        assert new.address == listen
        got = cli(new, prof, "recv", "ri_a")
        assert got.returncode == 2, got.stderr
        assert "is not the one this profile knows" in got.stderr
        assert "re-initialised" in got.stderr and got.stderr.count("\n") == 1
        # once the operator confirms it: drop the pin, register again, keys kept
        (prof / "kt" / f"{listen.replace(':', '_')}.json").unlink()
        ok(cli(new, prof, "register", "ri_a"))
        ok(cli(new, prof, "register", "ri_b"))
        ok(cli(new, prof, "send", "ri_b", "ri_a", "hello again"))  # message id 1 again
        assert [r["text"] for r in rows(ok(cli(new, prof, "recv", "ri_a", "--json")))] == [
            "hello again"]


async def test_an_ended_session_logs_in_again_with_qpq_password(
        server: RunningServer, client: ClientFactory, tmp_path: Path) -> None:
    prof = tmp_path / "profiles"
    register(server, prof, "rl_a")
    shutil.copytree(prof, tmp_path / "copy")  # the same keys, a session of its own
    async with server.connect() as conn:  # ... that logs the account out everywhere
        phone = QpqClient(conn, tmp_path / "copy")
        await phone.login("rl_a", "pw")
        await phone.logout("rl_a")
    told = cli(server, prof, "recv", "rl_a", password=None)
    assert told.returncode == 1
    assert "run `qpq-client login rl_a` or set QPQ_PASSWORD" in told.stderr
    again = ok(cli(server, prof, "recv", "rl_a"))
    assert "session has ended: logging in again" in again.stderr
    # a session the profile knows has expired: the same, without asking the server
    with Profile.edit(prof, "rl_a", server.address) as p:
        p.state().session_expires = time.time() - 1
    expired = cli(server, prof, "recv", "rl_a", password=None)
    assert expired.returncode == 1 and "has no live session" in expired.stderr
    assert "run `qpq-client login rl_a` or set QPQ_PASSWORD" in expired.stderr
    ok(cli(server, prof, "recv", "rl_a"))


def test_stdin_bodies_drop_one_trailing_newline_and_recipients_merge(
        server: RunningServer, tmp_path: Path) -> None:
    prof = tmp_path / "p"
    register(server, prof, "sn_a", "sn_b")
    sent = ok(cli(server, prof, "send", "sn_a", "sn_b,sn_b", stdin="one line\n"))
    assert "sent to sn_b (1 queued)" in sent.stdout
    ok(cli(server, prof, "send", "sn_a", "sn_b", stdin="two\n\n"))
    assert [r["text"] for r in rows(ok(cli(server, prof, "recv", "sn_b", "--json")))] == [
        "one line", "two\n"]


def test_a_wrong_ca_suggests_ca_and_a_huge_message_suggests_send_file(
        server: RunningServer, tmp_path: Path) -> None:
    other = tmp_path / "other-cert.pem"
    write_self_signed(other, tmp_path / "other-key.pem", "localhost")
    wrong = subprocess.run(
        [str(BIN / "qpq-client"), "--server", server.address, "--ca", str(other),
         "--profile", str(tmp_path / "p"), "recv", "ca_b"],
        capture_output=True, text=True, timeout=60, env=env_for(server))
    assert wrong.returncode == 1
    assert wrong.stderr.count("\n") == 1 and "certificate" in wrong.stderr
    assert "is --ca the server's certificate" in wrong.stderr
    prof = tmp_path / "p"
    register(server, prof, "big_a")
    huge = cli(server, prof, "send", "big_a", "big_a", stdin="y" * 2_000_000)
    assert huge.returncode == 1 and "too_large" in huge.stderr
    assert "send it as a file with `qpq-client send-file`" in huge.stderr
