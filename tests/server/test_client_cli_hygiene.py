"""`qpq-client` as a newcomer meets it (issue 12): help without a token or a server, one
clear line for a bad --ca, the client's exit codes, a password asked twice at register,
and the pieces that make message text and file names safe."""

from __future__ import annotations

import os
import pty
import subprocess
import time
from pathlib import Path

import pytest

from qpq_server.client.cli import app
from qpq_server.client.profile import Profile
from qpq_server.client.terminal import safe_file_name, safe_line, safe_text
from qpq_server.devserver import BIN

COMMANDS = [[name] for name in ("register", "login", "send", "send-file", "recv",
                                "passwd", "logout", "fingerprint", "trust", "devices",
                                "link", "unlink")] + [
    ["kt"], ["kt", "verify"]]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QPQ_")}
    env.update(extra)
    return env


def client(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "qpq-client"), *args], capture_output=True, text=True,
                          timeout=60, env=clean_env(**extra), stdin=subprocess.DEVNULL)


def test_every_command_has_help_without_a_token_or_a_server() -> None:
    top = client("--help")
    assert top.returncode == 0 and "Exit codes" in top.stdout
    for command in COMMANDS:
        result = client("--server", "127.0.0.1:9", *command, "--help")
        assert result.returncode == 0, (command, result.stderr)
        assert "Usage: qpq-client" in result.stdout and result.stderr == ""
    assert "64 usage error" in client("recv", "--help").stdout


def test_a_missing_or_non_pem_ca_is_one_clear_line_at_once(tmp_path: Path) -> None:
    junk = tmp_path / "cert.der"
    junk.write_bytes(b"\x30\x82 not pem")
    for ca, says in ((tmp_path / "nope.pem", "cannot read --ca"),
                     (junk, "is not a PEM certificate")):
        start = time.monotonic()
        result = client("--server", "127.0.0.1:9", "--ca", str(ca), "recv", "alice",
                        QPQ_AUTH_TOKEN="t", QPQ_PASSWORD="pw")
        assert result.returncode == 64, result.stderr
        assert says in result.stderr and result.stderr.count("\n") == 1
        assert time.monotonic() - start < 10  # no handshake timeout first


@pytest.mark.parametrize("args", [
    ["--nope", "recv", "a"],
    ["send-file", "a", "b", "/nonexistent/file"],
    ["recv", "a", "--wait", "-1"],
    ["send", "a", ",", "text"],
    ["recv", "a"],  # no token
])
def test_usage_errors_exit_64_not_2(args: list[str]) -> None:
    result = client("--server", "127.0.0.1:9", *args)
    assert result.returncode == 64, result.stderr
    assert "Traceback" not in result.stderr


def _on_a_terminal(args: list[str], answers: list[str]) -> tuple[int, str]:
    """Run with stdin/stdout on a pseudo-terminal, typing `answers` at each prompt."""
    leader, follower = pty.openpty()
    process = subprocess.Popen([str(BIN / "qpq-client"), *args], stdin=follower,
                               stdout=follower, stderr=follower, env=clean_env(),
                               start_new_session=True)
    os.close(follower)
    seen = b""
    try:
        for answer in answers:
            deadline = time.monotonic() + 30
            while seen.count(b": ") < answers.index(answer) + 1:
                assert time.monotonic() < deadline, seen
                seen += os.read(leader, 1024)
            os.write(leader, answer.encode() + b"\n")
        code = process.wait(timeout=30)
        try:
            while chunk := os.read(leader, 1024):
                seen += chunk
        except OSError:
            pass
    finally:
        os.close(leader)
        if process.poll() is None:
            process.kill()
            process.wait()
    return code, seen.decode(errors="replace")


def test_register_asks_the_password_twice_and_refuses_empty_or_different() -> None:
    code, shown = _on_a_terminal(["--server", "127.0.0.1:9", "register", "alice"],
                                 ["first", "second"])
    assert code == 64 and "new password for alice: " in shown and "again: " in shown
    assert "the two new passwords differ" in shown
    code, shown = _on_a_terminal(["--server", "127.0.0.1:9", "register", "alice"], [""])
    assert code == 64 and "must not be empty" in shown


def test_message_text_is_neutralised_for_the_terminal() -> None:
    assert safe_line("a\x1b[31mb\x07\x7f\x9b\u202e\u2066c\nd") == (
        "a\\x1b[31mb\\x07\\x7f\\x9b\\u202e\\u2066c\\x0ad")
    assert safe_text("one\r\ntwo\n[t] bob: x\rtab\there") == (
        "one\n    two\n    [t] bob: x\\x0dtab\there")
    assert safe_text("caf\u00e9 \U0001f600") == "caf\u00e9 \U0001f600"  # printable stays


@pytest.mark.parametrize(("name", "saved"), [
    ("../../etc/passwd", "passwd"), ("/abs/x.txt", "x.txt"), ("..", "attachment"),
    ("a\\..\\b.txt", "b.txt"), ("nul\x00.txt", "nul_.txt"), (".hidden", "hidden"),
    ("inv\u202egpj.exe", "inv_gpj.exe"), ("", "attachment"), ("\x1b[2J", "_[2J"),
])
def test_saved_file_names_stay_plain(name: str, saved: str) -> None:
    assert safe_file_name(name) == saved
    assert len(safe_file_name("\u00e9" * 300).encode()) <= 200


def test_profile_edits_are_read_modify_write_under_a_lock(tmp_path: Path) -> None:
    """Two writers that loaded the profile at different times both keep their change."""
    with Profile.edit(tmp_path, "u", "srv") as p:
        first = p.new_one_time_keys(1)
    stale = Profile.load_or_create(tmp_path, "u", "srv")
    with Profile.edit(tmp_path, "u", "srv") as p:  # another process adds keys
        second = p.new_one_time_keys(1)
    with Profile.edit(tmp_path, "u", "srv") as p:  # the stale holder's change goes via edit
        p.forget_one_time(first[0])
    assert first[0] in stale.one_time  # what it saw is not written back
    assert set(Profile.load_or_create(tmp_path, "u", "srv").one_time) == set(second)
    assert (tmp_path / "u.lock").stat().st_mode & 0o777 == 0o600


def test_help_texts_name_the_exit_codes() -> None:
    assert "64 usage error" in (app.info.help or "")


def test_a_profile_from_before_per_server_state_keeps_its_session(tmp_path: Path) -> None:
    import msgpack

    with Profile.edit(tmp_path, "old", "srv") as p:
        p.new_one_time_keys(1)
    data = msgpack.unpackb((tmp_path / "old.keys").read_bytes(), raw=False)
    del data["servers"]
    data.update(session="s3ss10n", session_expires=time.time() + 3600,
                published_identity=True, published_prekey=b"p" * 32)
    (tmp_path / "old.keys").write_bytes(msgpack.packb(data, use_bin_type=True))
    loaded = Profile.load_or_create(tmp_path, "old", "127.0.0.1:7000")
    assert loaded.knows("127.0.0.1:7000") and loaded.session == "s3ss10n"
    with Profile.edit(tmp_path, "old", "127.0.0.1:7000") as p:
        assert p.state().published_identity  # adopted by the first server it meets
    again = Profile.load_or_create(tmp_path, "old", "127.0.0.1:7000")
    assert list(again.servers) == ["127.0.0.1:7000"]
    assert not Profile.load_or_create(tmp_path, "old", "other:1").knows("other:1")


def test_the_seen_set_survives_and_is_compacted(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from qpq_server.client import inbox

    monkeypatch.setattr(inbox, "KEEP_IDS", 5)
    log = inbox.DeliveryLog(tmp_path, "127.0.0.1:7000#ab", "u")
    with log.delivering():
        for message_id in range(1, 12):
            log.add(message_id)
    with open(log.path, "a") as torn:
        torn.write("99")  # a crash mid-append: no newline, not counted
    with inbox.DeliveryLog(tmp_path, "127.0.0.1:7000#ab", "u").delivering() as again:
        assert again.seen(11) and again.seen(7) and not again.seen(1)
        assert not again.seen(99)
    assert log.path.stat().st_mode & 0o777 == 0o600
