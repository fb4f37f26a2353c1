"""`qpq-client`: register, log in, send and receive end-to-end-encrypted messages."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import io
import json
import logging
import os
import re
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from cryptography import x509

from qpq_server.client.api import QpqClient, ReceivedMessage
from qpq_server.client.connection import ClientError, connect
from qpq_server.client.contacts import fingerprint_digits, safety_number
from qpq_server.client.devices import DeviceInfo
from qpq_server.client.devices import link_code as link_code_keys
from qpq_server.client.inbox import DeliveryLog
from qpq_server.client.kt import KeyVerified, KtViolation
from qpq_server.client.profile import default_profile_dir
from qpq_server.client.terminal import safe_line, safe_text

__all__ = ["app", "main"]

T = TypeVar("T")
OK, FAILED, VERIFICATION_FAILED, USAGE = 0, 1, 2, 64
KT_VIOLATION_EXIT = VERIFICATION_FAILED
"""Exit code when verification fails: the key-transparency log, a contact's pinned
identity, or (for `recv`) a message that is not authentic."""

EXIT_CODES = ("Exit codes (every command): 0 ok; 1 failed (server, network, or for recv a "
              "message that could not be delivered, e.g. its attachment is gone); 2 "
              "verification failed (key-transparency log, a contact's changed key, a "
              "forged or undecryptable message); 64 usage error.")

# A file message whose attachment fails with one of these will never succeed: it is
# reported, recorded and acked so the rest of the inbox flows. Anything else (network,
# a full disk) leaves it queued for the next recv.
PERMANENT_FILE_ERRORS = frozenset({"not_found", "bad_attachment", "bad_message",
                                   "bad_request", "forbidden"})

app = typer.Typer(
    name="qpq-client",
    help="Talk to a qpq server: messages are encrypted on this machine before they leave "
         "it.\n\n" + EXIT_CODES,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@dataclass(frozen=True)
class Options:
    server: str
    auth_token: str | None
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
    timeout: Annotated[float, typer.Option(help="Seconds to wait for each request.",
                                           min=0.1)] = 10.0,
) -> None:
    """Global options come before the command, e.g.
    `qpq-client --server 127.0.0.1:7000 --ca data/tls/cert.pem recv alice`."""
    source = ctx.get_parameter_source("auth_token")
    if auth_token and source is not None and source.name == "COMMANDLINE":
        print("qpq-client: warning: --auth-token on the command line is visible to other "
              "users of this machine (ps, shell history); set QPQ_AUTH_TOKEN instead",
              file=sys.stderr)
    # The token and the CA are checked when a command talks to the server, so that
    # `COMMAND --help` works without either.
    ctx.obj = Options(server, auth_token or None, ca, profile or default_profile_dir(),
                      server_name, timeout)


def _die(code: str, message: str, exit_code: int = FAILED) -> typer.Exit:
    print(f"qpq-client: error: {code}: {safe_line(message)}", file=sys.stderr)
    raise typer.Exit(exit_code)


def _note(message: str) -> None:
    print(f"qpq-client: {message}", file=sys.stderr)


def _password(prompt: str) -> str:
    value = os.environ.get("QPQ_PASSWORD")
    if value:
        return value
    if not sys.stdin.isatty():
        _die("usage", "no password: set QPQ_PASSWORD or run in a terminal to be prompted",
             USAGE)
    return getpass.getpass(prompt)


def _check_ca(ca: Path | None) -> None:
    """A missing or non-PEM --ca is one clear line at once (not a TLS failure after the
    handshake timeout)."""
    if ca is None:
        return
    try:
        data = ca.read_bytes()
    except OSError as exc:
        _die("usage", f"cannot read --ca {ca}: {exc.strerror or exc}", USAGE)
    try:
        x509.load_pem_x509_certificates(data)
    except ValueError:
        _die("usage", f"--ca {ca} is not a PEM certificate (expected a file starting "
                      "with -----BEGIN CERTIFICATE-----, e.g. DATA_DIR/tls/cert.pem)", USAGE)


def _hint(exc: ClientError) -> str:
    text = exc.message
    if exc.code in ("connection_closed", "unreachable") and "certificate" in text.lower():
        text += " (is --ca the server's certificate, e.g. DATA_DIR/tls/cert.pem?)"
    return text


def _run(opts: Options, work: Callable[[QpqClient], Awaitable[T]]) -> T:
    if not opts.auth_token:
        _die("usage", "no access token: set QPQ_AUTH_TOKEN (or --auth-token)", USAGE)
    _check_ca(opts.ca)
    # aioquic logs a failed handshake itself; the one line below says it, with a hint
    logging.getLogger("quic").setLevel(logging.CRITICAL)

    async def main() -> T:
        async with connect(opts.server, opts.auth_token or "", ca=opts.ca,
                           server_name=opts.server_name, timeout=opts.timeout) as conn:
            return await work(QpqClient(conn, opts.profile))

    try:
        return asyncio.run(main())
    except KtViolation as exc:
        raise _die(exc.code, exc.message, VERIFICATION_FAILED) from None
    except ClientError as exc:
        raise _die(exc.code, _hint(exc), USAGE if exc.code == "usage" else FAILED) from None
    except OSError as exc:
        raise _die("io", str(exc)) from None


async def _ensure_login(client: QpqClient, user: str) -> None:
    """Log in when there is no live session on this server: say so when the server is
    new to this profile (its keys get published there)."""
    new = await client.identify_server(user)
    if new and client.profile(user).path.exists():
        _note(f"note: this profile has not been used with {client.server} before: "
              f"logging {user} in there and publishing {user}'s keys")
    if not client.has_session(user):
        if not _can_ask_password():
            raise ClientError(
                "invalid_session", f"{user} has no live session on {client.server} "
                f"(expired, logged out, or never logged in here): run `qpq-client login "
                f"{user}` or set QPQ_PASSWORD")
        await client.login(user, _password(f"password for {user}: "))


def _can_ask_password() -> bool:
    return bool(os.environ.get("QPQ_PASSWORD")) or sys.stdin.isatty()


async def _logged_in(client: QpqClient, user: str, op: Callable[[], Awaitable[T]]) -> T:
    """Run `op` with a session; when the server ended it (expired, logged out elsewhere,
    password changed), log in again once, with QPQ_PASSWORD or a prompt."""
    await _ensure_login(client, user)
    try:
        return await op()
    except ClientError as exc:
        if exc.code != "invalid_session" or isinstance(exc, KtViolation):
            raise
    if not _can_ask_password():
        raise ClientError("invalid_session",
                          f"{user}'s session has ended (expired, logged out, or the password "
                          f"changed): run `qpq-client login {user}` or set QPQ_PASSWORD")
    _note(f"{user}'s session has ended: logging in again")
    await client.login(user, _password(f"password for {user}: "))
    return await op()


@app.command(epilog=EXIT_CODES)
def register(ctx: typer.Context, user: str) -> None:
    """Create an account (OPAQUE: the server never sees your password) and publish keys.
    The password comes from QPQ_PASSWORD, else it is asked twice. A profile may hold
    accounts on several servers (the same keys, a session per server)."""
    opts: Options = ctx.obj
    password = os.environ.get("QPQ_PASSWORD") or _new_password(user)

    async def work(c: QpqClient) -> None:
        if await c.identify_server(user) and c.profile(user).path.exists():
            _note(f"note: this profile has not been used with {c.server} before: "
                  f"registering {user} there with the keys it already holds")
        await c.register(user, password)

    _run(opts, work)
    print(f"registered {user}")


@app.command(epilog=EXIT_CODES)
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
            _die("usage", exc.message, USAGE)
    password = _password(f"password for {user}: ")

    async def work(c: QpqClient) -> None:
        if await c.identify_server(user) and c.profile(user).path.exists():
            _note(f"note: this profile has not been used with {c.server} before: "
                  f"publishing {user}'s keys there")
        await c.login(user, password, link=link_code)

    _run(opts, work)
    print(f"logged in as {user}")


@app.command(epilog=EXIT_CODES)
def passwd(ctx: typer.Context, user: str) -> None:
    """Change your password: the current one (QPQ_PASSWORD or a prompt) proves it is you,
    then the new one (QPQ_NEW_PASSWORD or a prompt, asked twice). Every other session of
    the account ends."""
    opts: Options = ctx.obj
    old = _password(f"current password for {user}: ")
    new = os.environ.get("QPQ_NEW_PASSWORD") or _new_password(user)
    _run(opts, lambda c: c.change_password(user, old, new))
    print(f"password changed for {user}; other sessions of {user} are logged out")


@app.command(epilog=EXIT_CODES)
def logout(ctx: typer.Context, user: str) -> None:
    """End every session of USER, on every device (sessions are bearer tokens)."""
    opts: Options = ctx.obj
    _run(opts, lambda c: c.logout(user))
    print(f"logged out {user} everywhere")


def _new_password(user: str) -> str:
    if not sys.stdin.isatty():
        _die("usage", "no new password: set QPQ_PASSWORD (QPQ_NEW_PASSWORD for passwd) "
                      "or run in a terminal to be prompted", USAGE)
    first = getpass.getpass(f"new password for {user}: ")
    if not first:
        _die("usage", "the new password must not be empty", USAGE)
    if getpass.getpass("again: ") != first:
        _die("usage", "the two new passwords differ", USAGE)
    return first


def _recipients(value: str) -> list[str]:
    """a,b,a -> [a, b]: each recipient once, in the order given."""
    names = list(dict.fromkeys(r.strip() for r in value.split(",") if r.strip()))
    if not names:
        _die("usage", "no recipient given", USAGE)
    return names


def _read_body() -> str:
    """stdin, less one trailing newline (what `echo` and editors add), so
    `echo hi | send` and `send A B hi` send the same text."""
    if sys.stdin.isatty():
        _note("type the message, then Ctrl-D on a new line")
    body = sys.stdin.read()
    return body[:-1] if body.endswith("\n") else body


@app.command(epilog=EXIT_CODES)
def send(
    ctx: typer.Context,
    sender: Annotated[str, typer.Argument(metavar="FROM")],
    recipient: Annotated[str, typer.Argument(metavar="TO", help="Recipient; several as a,b,c")],
    text: Annotated[str | None, typer.Argument(
        help="Message text (default: read stdin, less one trailing newline).")] = None,
) -> None:
    """Encrypt TEXT (or stdin) to TO's published keys and send it. Each recipient's
    identity must be in the key-transparency log and match the key pinned for them
    (pinned on first use); a changed key stops the send (exit 2) until you compare
    `qpq-client fingerprint TO` with them and run `qpq-client trust TO`. A recipient
    named twice gets the message once."""
    opts: Options = ctx.obj
    recipients = _recipients(recipient)
    body = text if text is not None else _read_body()

    async def work(c: QpqClient) -> list[int]:
        try:
            return await _logged_in(c, sender, lambda: c.send_text(sender, recipients, body))
        except ClientError as exc:
            if exc.code in ("too_large", "bad_frame"):
                raise ClientError(exc.code, f"{exc.message}: the message is too large for "
                                  "one request; send it as a file with `qpq-client "
                                  "send-file`") from None
            raise

    ids = _run(opts, work)
    print(f"sent to {', '.join(recipients)} ({len(ids)} queued)")


def _emit(line: str) -> None:
    """Write one line to stdout and make sure it got there (an error raises, and the
    message stays queued). Unencodable characters are shown escaped, never an error."""
    sys.stdout.flush()  # anything printed before goes first
    encoding = sys.stdout.encoding or "utf-8"
    data = (line + "\n").encode(encoding, errors="backslashreplace")
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, io.UnsupportedOperation):  # not a file (tests in process)
        sys.stdout.write(data.decode(encoding))
        sys.stdout.flush()
        return
    # os.write, not print: a failed write must not stay in a buffer that Python retries
    # (and reports again) at exit.
    while data:
        data = data[os.write(fd, data):]


def _json_row(message: ReceivedMessage, path: Path | None,
              failure: ClientError | None) -> str:
    entry: dict[str, object] = {"id": message.id, "from": message.sender,
                                "sent_at": message.sent_at, "verified": message.verified}
    if not message.verified:
        entry["error"] = message.error
        entry["detail"] = message.text
    elif failure is not None:
        entry["error"] = "attachment_failed"
        entry["detail"] = f"{failure.code}: {failure.message}"
        entry["text"] = message.text
    else:
        entry["text"] = message.text
    if path is not None:
        size = message.content.get("size")  # the sender's claim: only an int is shown
        entry["file"] = {"name": path.name, "path": str(path),
                         "size": size if isinstance(size, int) else path.stat().st_size}
    return json.dumps(entry)


def _human_row(message: ReceivedMessage, path: Path | None,
               failure: ClientError | None) -> str:
    stamp = datetime.fromtimestamp(message.sent_at, UTC).strftime("%Y-%m-%d %H:%M:%S")
    where = f" -> saved to {safe_line(str(path))}" if path is not None else ""
    mark = "" if message.verified else f"REJECTED ({message.error}) "
    if failure is not None:
        mark = f"FAILED (attachment: {failure.code}) "
    return f"[{stamp}] {mark}{safe_line(message.sender)}: {safe_text(message.text)}{where}"


@dataclass
class _RecvTally:
    shown: int = 0
    duplicates: int = 0
    rejected: int = 0
    failed: int = 0


@app.command(epilog=EXIT_CODES)
def recv(
    ctx: typer.Context,
    user: str,
    wait: Annotated[float, typer.Option(
        min=0.0, help="Long-poll up to SECONDS for a message (the server caps the wait: "
                      "its limits.max_wait_s, 60 s by default).")] = 0.0,
    out: Annotated[Path | None, typer.Option(
        help="Directory for received files (default: the current directory). Files are "
             "downloaded and decrypted before their messages are acknowledged; existing "
             "files are never overwritten; names are reduced to a plain file name.")] = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help='One JSON object per message: "id", "from", "sent_at", "verified", '
                       '"text", and "file" for attachments; a message that failed has '
                       '"error" (e.g. "undecryptable", "forged_sender", '
                       '"attachment_failed") and "detail" instead of "text".')] = False,
) -> None:
    """Fetch, authenticate, decrypt and show USER's pending messages (and save
    attachments). A message is acknowledged only once it was written out (stdout
    flushed, file saved): if that fails it comes again on the next recv, and one
    already shown is shown once (a seen-set in the profile). A message not sealed by its
    sender's logged identity key, or that cannot be decrypted, is shown REJECTED and the
    exit code is 2; a file message whose attachment is gone or damaged is shown FAILED,
    recorded in the profile (inbox/SERVER/USER.failures.jsonl) and acknowledged so the
    rest flows, and the exit code is 1; messages from a contact whose key changed stay
    queued until `qpq-client trust`. Text from messages is shown with terminal escapes
    and bidi overrides escaped, continuation lines indented."""
    opts: Options = ctx.obj
    out_dir = out or Path.cwd()
    tally = _RecvTally()
    dropped = 0

    async def work(c: QpqClient) -> None:
        await c.identify_server(user)  # the seen-set is per server, ids restart on a new one
        log = DeliveryLog(opts.profile, c.server_id, user)

        async def deliver(message: ReceivedMessage) -> None:
            with log.delivering():
                if log.seen(message.id):  # shown before, its ack was lost: ack it now
                    tally.duplicates += 1
                    return
                path: Path | None = None
                failure: ClientError | None = None
                if message.verified and message.content.get("type") == "file":
                    try:
                        path = await c.save_file(user, message, out_dir)
                    except ClientError as exc:
                        if exc.code not in PERMANENT_FILE_ERRORS:
                            raise
                        failure = exc
                if not message.verified or failure is not None:
                    why = (f"SECURITY: {message.error}: message {message.id} claiming to be "
                           f"from {message.sender} rejected: {message.text}"
                           if failure is None else
                           f"message {message.id} from {message.sender}: its attachment "
                           f"cannot be fetched ({failure.code}: {failure.message}); "
                           f"recorded in {log.failures_path}")
                    _note(safe_line(why))
                _emit(_json_row(message, path, failure) if as_json
                      else _human_row(message, path, failure))
                if message.error == "identity_changed":
                    return  # stays queued: shown again until `trust`
                if failure is not None:  # after it was shown: a crash before shows it again
                    log.record_failure(message.id, message.sender, message.sent_at,
                                       failure.code, failure.message)
                log.add(message.id)
                tally.shown += 1
                tally.rejected += not message.verified
                tally.failed += failure is not None

        async def fetch_all() -> None:
            # Each page's ack rides on the next page's fetch; the last one goes alone.
            try:
                await c.receive(user, wait_s=wait, before_ack=deliver, defer_ack=True)
                while c.more_waiting:  # the server pages a large mailbox by bytes
                    await c.receive(user, before_ack=deliver, defer_ack=True)
            except Exception:
                with contextlib.suppress(ClientError):  # the first error is the one to see
                    await c.flush_acks(user)
                raise
            await c.flush_acks(user)

        try:
            await _logged_in(c, user, fetch_all)
        finally:
            nonlocal dropped
            dropped = c.replays_dropped

    _run(opts, work)
    if dropped or tally.duplicates:
        _note(f"dropped {dropped + tally.duplicates} message(s) already received once")
    if tally.rejected:
        raise typer.Exit(VERIFICATION_FAILED)
    if tally.failed:
        raise typer.Exit(FAILED)


@app.command("send-file", epilog=EXIT_CODES)
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
    recipients = _recipients(recipient)

    async def work(c: QpqClient) -> list[int]:
        return await _logged_in(c, sender, lambda: c.send_file(sender, recipients, path))

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
        return await c.lookup(user)

    result = _run(opts, work)
    if as_json:
        print(json.dumps({
            "user": user, "identity_key": result.identity_key.hex(),
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
                          "as that user first, or pass --profile)", USAGE)
        return me
    names = sorted(p.stem for p in opts.profile.glob("*.keys"))
    if len(names) != 1:
        found = ", ".join(names) if names else "none"
        _die("usage", f"say which of your users to compare with --as USER "
                      f"(profiles in {opts.profile}: {found})", USAGE)
    return names[0]


@app.command(epilog=EXIT_CODES)
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
        found = await c.lookup(user)
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
        raise typer.Exit(VERIFICATION_FAILED)


@app.command(epilog=EXIT_CODES)
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
        found = await c.lookup(user)
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


@app.command(epilog=EXIT_CODES)
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


@app.command(epilog=EXIT_CODES)
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
        _die("usage", f"--wait must be between 0 and 600 seconds, not {wait:g}", USAGE)
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


@app.command(epilog=EXIT_CODES)
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
                      "devices` shows)", USAGE)
    password = _password(f"password for {user}: ")
    left = _run(opts, lambda c: c.unlink(user, password, device))
    print(f"unlinked device {device} from {user} ({left} device(s) left)")


def main() -> None:
    """Run the CLI with the client's exit codes: usage errors exit 64, not click's 2
    (2 means a verification failure); an error no command handled is one line, exit 1."""
    # typer vendors click; its UsageError is what a bad option or argument raises.
    from typer._click.exceptions import ClickException, UsageError

    try:
        code = app(standalone_mode=False)
    except UsageError as exc:
        exc.show()
        sys.exit(USAGE)
    except ClickException as exc:
        exc.show()
        sys.exit(FAILED)
    except typer.Abort:
        print("Aborted.", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # a bug: say what broke in one line
        line = " ".join(f"unexpected {type(exc).__name__}: {exc}".split())
        print(f"qpq-client: error: {safe_line(line)[:500]}", file=sys.stderr)
        sys.exit(FAILED)
    sys.exit(code if isinstance(code, int) else OK)
