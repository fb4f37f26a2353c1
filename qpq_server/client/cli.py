"""`qpq-client`: register, log in, send and receive end-to-end-encrypted messages."""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import re
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from qpq_server.client.api import QpqClient, ReceivedMessage
from qpq_server.client.connection import ClientError, connect
from qpq_server.client.contacts import fingerprint_digits, safety_number
from qpq_server.client.devices import DeviceInfo
from qpq_server.client.devices import link_code as link_code_keys
from qpq_server.client.kt import KeyVerified, KtViolation
from qpq_server.client.profile import default_profile_dir

__all__ = ["app", "main"]

T = TypeVar("T")
KT_VIOLATION_EXIT = 2
"""Exit code when verification fails: the key-transparency log, a contact's pinned
identity, or (for `recv`) a message that is not authentic."""

app = typer.Typer(
    name="qpq-client",
    help="Talk to a qpq server: messages are encrypted on this machine before they leave it.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@dataclass(frozen=True)
class Options:
    server: str
    auth_token: str
    ca: Path | None
    profile: Path
    server_name: str | None
    timeout: float


@app.callback()
def options(
    ctx: typer.Context,
    server: Annotated[str, typer.Option(help="Server address HOST:PORT.",
                                        envvar="QPQ_SERVER")] = "127.0.0.1:7000",
    auth_token: Annotated[str | None, typer.Option(
        help="Server access token (prefer the QPQ_AUTH_TOKEN environment variable: "
             "command lines are visible to other users).",
        envvar="QPQ_AUTH_TOKEN", show_envvar=True)] = None,
    ca: Annotated[Path | None, typer.Option(help="CA certificate (PEM) to trust for the "
                                            "server, e.g. DATA_DIR/tls/cert.pem.")] = None,
    profile: Annotated[Path | None, typer.Option(
        help="Directory holding your private keys (default ~/.local/share/qpq-client).")] = None,
    server_name: Annotated[str | None, typer.Option(
        help="TLS name to verify (default: the host part of --server).")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for each request.")] = 10.0,
) -> None:
    """Global options come before the command, e.g.
    `qpq-client --server 127.0.0.1:7000 --ca data/tls/cert.pem recv alice`."""
    if not auth_token:
        _die("usage", "no access token: set QPQ_AUTH_TOKEN (or --auth-token)", 64)
    source = ctx.get_parameter_source("auth_token")
    if source is not None and source.name == "COMMANDLINE":
        print("qpq-client: warning: --auth-token on the command line is visible to other "
              "users of this machine (ps, shell history); set QPQ_AUTH_TOKEN instead",
              file=sys.stderr)
    ctx.obj = Options(server, auth_token or "", ca, profile or default_profile_dir(),
                      server_name, timeout)


def _die(code: str, message: str, exit_code: int = 1) -> typer.Exit:
    print(f"qpq-client: error: {code}: {message}", file=sys.stderr)
    raise typer.Exit(exit_code)


def _password(prompt: str) -> str:
    value = os.environ.get("QPQ_PASSWORD")
    if value:
        return value
    if not sys.stdin.isatty():
        _die("usage", "no password: set QPQ_PASSWORD or run in a terminal to be prompted", 64)
    return getpass.getpass(prompt)


def _run(opts: Options, work: Callable[[QpqClient], Awaitable[T]]) -> T:
    async def main() -> T:
        async with connect(opts.server, opts.auth_token, ca=opts.ca,
                           server_name=opts.server_name, timeout=opts.timeout) as conn:
            return await work(QpqClient(conn, opts.profile))

    try:
        return asyncio.run(main())
    except KtViolation as exc:
        raise _die(exc.code, exc.message, KT_VIOLATION_EXIT) from None
    except ClientError as exc:
        raise _die(exc.code, exc.message) from None
    except OSError as exc:
        raise _die("io", str(exc)) from None


async def _ensure_login(client: QpqClient, user: str) -> None:
    if not client.has_session(user):
        await client.login(user, _password(f"password for {user}: "))


@app.command()
def register(ctx: typer.Context, user: str) -> None:
    """Create an account (OPAQUE: the server never sees your password) and publish keys."""
    opts: Options = ctx.obj
    password = _password(f"new password for {user}: ")
    _run(opts, lambda c: c.register(user, password))
    print(f"registered {user}")


@app.command()
def login(
    ctx: typer.Context,
    user: str,
    link_code: Annotated[str | None, typer.Option(
        help="Adding this device to an account that has one already: the code "
             "`qpq-client link USER` printed on an existing device (it waits for you).")
    ] = None,
) -> None:
    """Log in and keep the session in the profile; tops up one-time key packages. A new
    device (an empty --profile) needs the password and, when the account has a device
    already, a link code from it. Exit 2 when the account lists a device none of yours
    approved."""
    opts: Options = ctx.obj
    if link_code is not None:
        try:
            link_code_keys(link_code)
        except ClientError as exc:
            _die("usage", exc.message, 64)
    password = _password(f"password for {user}: ")

    async def work(c: QpqClient) -> None:
        await c.login(user, password, link=link_code)

    _run(opts, work)
    print(f"logged in as {user}")


@app.command()
def passwd(ctx: typer.Context, user: str) -> None:
    """Change your password: the current one (QPQ_PASSWORD or a prompt) proves it is you,
    then the new one (QPQ_NEW_PASSWORD or a prompt, asked twice). Every other session of
    the account ends."""
    opts: Options = ctx.obj
    old = _password(f"current password for {user}: ")
    new = os.environ.get("QPQ_NEW_PASSWORD") or _new_password(user)
    _run(opts, lambda c: c.change_password(user, old, new))
    print(f"password changed for {user}; other sessions of {user} are logged out")


@app.command()
def logout(ctx: typer.Context, user: str) -> None:
    """End every session of USER, on every device (sessions are bearer tokens)."""
    opts: Options = ctx.obj
    _run(opts, lambda c: c.logout(user))
    print(f"logged out {user} everywhere")


def _new_password(user: str) -> str:
    if not sys.stdin.isatty():
        _die("usage", "no new password: set QPQ_NEW_PASSWORD or run in a terminal", 64)
    first = getpass.getpass(f"new password for {user}: ")
    if not first:
        _die("usage", "the new password must not be empty", 64)
    if getpass.getpass("again: ") != first:
        _die("usage", "the two new passwords differ", 64)
    return first


@app.command()
def send(
    ctx: typer.Context,
    sender: Annotated[str, typer.Argument(metavar="FROM")],
    recipient: Annotated[str, typer.Argument(metavar="TO", help="Recipient; several as a,b,c")],
    text: Annotated[str | None, typer.Argument(help="Message text (default: read stdin).")] = None,
) -> None:
    """Encrypt TEXT (or stdin) to TO's published keys and send it. Each recipient's
    identity must be in the key-transparency log and match the key pinned for them
    (pinned on first use); a changed key stops the send (exit 2) until you compare
    `qpq-client fingerprint TO` with them and run `qpq-client trust TO`."""
    opts: Options = ctx.obj
    body = text if text is not None else sys.stdin.read()
    recipients = [r for r in recipient.split(",") if r]

    async def work(c: QpqClient) -> list[int]:
        await _ensure_login(c, sender)
        return await c.send_text(sender, recipients, body)

    ids = _run(opts, work)
    print(f"sent to {', '.join(recipients)} ({len(ids)} queued)")


@app.command()
def recv(
    ctx: typer.Context,
    user: str,
    wait: Annotated[float, typer.Option(help="Long-poll up to SECONDS for a message.")] = 0.0,
    out: Annotated[Path | None, typer.Option(
        help="Directory for received files (default: the current directory). Files are "
             "downloaded and decrypted before their messages are acknowledged; existing "
             "files are never overwritten.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per message.")] = False,
) -> None:
    """Fetch, authenticate, decrypt and acknowledge USER's pending messages (and save
    attachments). A message not sealed by its sender's logged identity key is shown
    REJECTED (in --json: "verified": false and an "error" code) and the exit code is 2;
    messages from a contact whose key changed stay queued until `qpq-client trust`;
    copies of messages already received are dropped."""
    opts: Options = ctx.obj
    out_dir = out or Path.cwd()
    saved: dict[int, Path] = {}

    async def work(c: QpqClient) -> list[ReceivedMessage]:
        await _ensure_login(c, user)

        async def save(message: ReceivedMessage) -> None:
            if message.content.get("type") == "file":
                saved[message.id] = await c.save_file(user, message, out_dir)

        received = list(await c.receive(user, wait_s=wait, before_ack=save))
        while c.more_waiting:  # the server pages a large mailbox by bytes
            received += await c.receive(user, before_ack=save)
        return received

    dropped = 0

    async def work_counted(c: QpqClient) -> list[ReceivedMessage]:
        nonlocal dropped
        try:
            return await work(c)
        finally:
            dropped = c.replays_dropped

    messages = _run(opts, work_counted)
    if dropped:
        print(f"qpq-client: dropped {dropped} replayed message(s) (already received once)",
              file=sys.stderr)
    for message in messages:
        path = saved.get(message.id)
        if not message.verified:
            print(f"qpq-client: SECURITY: {message.error}: message {message.id} claiming to "
                  f"be from {message.sender} rejected: {message.text}", file=sys.stderr)
        if as_json:
            entry: dict[str, object] = {"from": message.sender, "text": message.text,
                                        "sent_at": message.sent_at,
                                        "verified": message.verified}
            if message.error:
                entry["error"] = message.error
            if path is not None:
                entry["file"] = {"name": path.name, "path": str(path),
                                 "size": message.content.get("size")}
            print(json.dumps(entry))
        else:
            stamp = datetime.fromtimestamp(message.sent_at, UTC).strftime("%Y-%m-%d %H:%M:%S")
            where = f" -> saved to {path}" if path is not None else ""
            mark = "" if message.verified else f"REJECTED ({message.error}) "
            print(f"[{stamp}] {mark}{message.sender}: {message.text}{where}")
    if any(not m.verified for m in messages):
        raise typer.Exit(KT_VIOLATION_EXIT)


@app.command("send-file")
def send_file(
    ctx: typer.Context,
    sender: Annotated[str, typer.Argument(metavar="FROM")],
    recipient: Annotated[str, typer.Argument(metavar="TO", help="Recipient; several as a,b,c")],
    path: Annotated[Path, typer.Argument(help="The file to send.", exists=True,
                                         dir_okay=False, readable=True)],
) -> None:
    """Encrypt PATH on this machine, upload the ciphertext as an attachment and send its
    key to TO end to end. The server never sees the name, the key or the contents."""
    opts: Options = ctx.obj
    recipients = [r for r in recipient.split(",") if r]

    async def work(c: QpqClient) -> list[int]:
        await _ensure_login(c, sender)
        return await c.send_file(sender, recipients, path)

    ids = _run(opts, work)
    print(f"sent {path.name} to {', '.join(recipients)} ({len(ids)} queued)")


kt_app = typer.Typer(help="Key transparency: check the server's signed, append-only log of "
                          "identity keys.", no_args_is_help=True)
app.add_typer(kt_app, name="kt")


@kt_app.command("verify")
def kt_verify(
    ctx: typer.Context,
    user: str,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Check that USER's current identity key is in the server's signed log, and that the
    log only grew since the tree head pinned in your profile. Exit 2, loudly, when the
    server forked, truncated or rewrote its log."""
    opts: Options = ctx.obj

    async def work(c: QpqClient) -> KeyVerified:
        return await c.kt.lookup(user)

    result = _run(opts, work)
    if as_json:
        print(json.dumps({
            "user": result.username, "identity_key": result.identity_key.hex(),
            "leaf_index": result.leaf_index, "tree_size": result.head.size,
            "root": result.head.root.hex(), "previous_size": result.previous_size,
            "verified": True}))
        return
    since = ("first contact: tree head pinned" if result.previous_size is None else
             f"consistent with the pinned head of size {result.previous_size}")
    print(f"{user}: identity key {result.identity_key.hex()[:16]}... is leaf "
          f"{result.leaf_index} of the signed log (size {result.head.size}); {since}")


def _me(opts: Options, me: str | None) -> str:
    """The local user to compare against: --as, else the only profile here."""
    if me:
        if not (opts.profile / f"{me}.keys").is_file():
            _die("usage", f"no profile for {me} in {opts.profile} (register or log in "
                          "as that user first, or pass --profile)", 64)
        return me
    names = sorted(p.stem for p in opts.profile.glob("*.keys"))
    if len(names) != 1:
        found = ", ".join(names) if names else "none"
        _die("usage", f"say which of your users to compare with --as USER "
                      f"(profiles in {opts.profile}: {found})", 64)
    return names[0]


@app.command()
def fingerprint(
    ctx: typer.Context,
    user: str,
    me: Annotated[str | None, typer.Option(
        "--as", help="Your own user (default: the only profile in --profile).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Print the safety number of you and USER. Read it to each other in person or on a
    call: when both of you see the same 60 digits, nobody sits in between. USER's key
    comes from the key-transparency log and must match the key pinned for USER."""
    opts: Options = ctx.obj
    local = _me(opts, me)

    async def work(c: QpqClient) -> tuple[bytes, bytes, bool]:
        found = await c.kt.lookup(user)
        pinned = c.pins.get(user)
        mine = (await c.kt.lookup(local)).identity_key  # the account's logged device set
        return mine, found.identity_key, (
            pinned is None or pinned == found.identity_key)

    mine, theirs, matches_pin = _run(opts, work)
    number = safety_number(local, mine, user, theirs)
    if as_json:
        print(json.dumps({"user": user, "me": local, "safety_number": number,
                          "identity_key": theirs.hex(), "matches_pin": matches_pin}))
    else:
        print(f"safety number for {local} and {user}:\n  {number}")
        if not matches_pin:
            print(f"WARNING: {user}'s key differs from the one you pinned; after "
                  f"comparing, accept it with `qpq-client trust {user}`")
    if not matches_pin:
        raise typer.Exit(KT_VIOLATION_EXIT)


@app.command()
def trust(
    ctx: typer.Context,
    user: str,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Accept USER's current identity key (after a key change stopped `send`): it is
    checked against the key-transparency log and pinned. Compare safety numbers with
    `qpq-client fingerprint USER` first."""
    opts: Options = ctx.obj

    async def work(c: QpqClient) -> tuple[bytes, bytes | None]:
        found = await c.kt.lookup(user)
        previous = c.pins.get(user)
        c.pins.pin(user, found.identity_key)
        return found.identity_key, previous

    key, previous = _run(opts, work)
    if as_json:
        print(json.dumps({"user": user, "identity_key": key.hex(),
                          "previous": previous.hex() if previous else None}))
    elif previous == key:
        print(f"{user}: identity key {key.hex()[:16]}... was already trusted")
    else:
        print(f"{user}: now trusting identity key {key.hex()[:16]}...")


@app.command()
def devices(
    ctx: typer.Context,
    user: str,
    as_json: Annotated[bool, typer.Option("--json", help="Print the devices as JSON.")] = False,
) -> None:
    """List USER's devices (id, when added, fingerprint, which one is this) after
    checking them against the key-transparency log. Exit 2 when the log lists a device
    that none of your devices approved (someone else added it)."""
    opts: Options = ctx.obj

    async def work(c: QpqClient) -> list[DeviceInfo]:
        await _ensure_login(c, user)
        return await c.check_own_devices(c.profile(user))

    found = _run(opts, work)
    if as_json:
        print(json.dumps({"user": user, "devices": [
            {"id": d.id, "created_at": d.created_at, "this_device": d.this_device,
             "fingerprint": fingerprint_digits(user, d.identity),
             "identity_key": d.identity.hex(), "endorsed_by": list(d.endorsed_by)}
            for d in found]}))
        return
    for d in found:
        added = datetime.fromtimestamp(d.created_at, UTC).strftime("%Y-%m-%d %H:%M")
        mark = "  (this device)" if d.this_device else ""
        print(f"{d.id}  added {added}  {fingerprint_digits(user, d.identity)}{mark}")


@app.command()
def link(
    ctx: typer.Context,
    user: str,
    wait: Annotated[float, typer.Option(
        help="Seconds to wait for the new device (0 to 600, the code's lifetime).")] = 300.0,
) -> None:
    """Approve a new device for USER from this one: prints a one-use code (valid 10
    minutes), then waits while you run `qpq-client login USER --link-code CODE` on the
    new device, checks that device used the code and vouches for it, so your other
    devices accept it. The password is asked here too."""
    opts: Options = ctx.obj
    if not 0 <= wait <= 600:
        _die("usage", f"--wait must be between 0 and 600 seconds, not {wait:g}", 64)
    password = _password(f"password for {user}: ")

    async def work(c: QpqClient) -> DeviceInfo | None:
        code = await c.link(user, password)
        print(f"link code for {user}: {code}\n  on the new device run: qpq-client login "
              f"{user} --link-code {code}", flush=True)
        return await c.wait_for_linked_device(user, wait)

    linked = _run(opts, work)
    if linked is None:
        raise _die("link_timeout", f"no new device used the code within {wait:.0f} s; it stays "
             "valid until it expires (run `qpq-client devices` later to vouch for it)")
    print(f"linked device {linked.id} to {user}")


@app.command()
def unlink(
    ctx: typer.Context,
    user: str,
    device: Annotated[str, typer.Argument(metavar="DEVICE",
                                          help="The device id `qpq-client devices` shows.")],
) -> None:
    """Remove DEVICE from USER (the password is asked): the key-transparency log records
    it, senders stop encrypting to it, its queued messages are deleted and every session
    of the account ends (this device gets a new one; the others log in again)."""
    opts: Options = ctx.obj
    if not re.fullmatch(r"[0-9a-f]{16}", device):
        _die("usage", f"{device!r} is not a device id (16 hex digits, as `qpq-client "
                      "devices` shows)", 64)
    password = _password(f"password for {user}: ")
    left = _run(opts, lambda c: c.unlink(user, password, device))
    print(f"unlinked device {device} from {user} ({left} device(s) left)")


def main() -> None:
    app()
