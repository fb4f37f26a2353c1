"""Secrets canary: the suite's own logs and outputs must never contain its secrets.

A pytest plugin (loaded from tests/conftest.py). During the session it records
* the captured stdout/stderr/log of every test,
* the stdout/stderr of every `subprocess.run` that captured output (the commands the
  suite ran: qpq-server init, qpq-ops, qpq-client …);
and at the end it also reads every `*.log` file under the session's temp dir (server
logs from tests/helpers/server.py and friends). The secrets are what the suite used:
every QPQ_* token, key or password found in an `.env` under the temp dir, and the
passwords the test helpers log in with. Any hit fails the session (at the teardown of
its last test), naming the file and the kind of secret, never the secret itself.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qpq_server.secrets import read_env_file

_SECRET_ENV = ("QPQ_AUTH_TOKEN", "QPQ_DB_KEY", "QPQ_PASSWORD", "QPQ_DATABASE_URL")
_MIN_SECRET_LEN = 12  # shorter strings would match by chance
_MAX_SCAN_BYTES = 50_000_000

_outputs: list[tuple[str, str]] = []  # (where, text)


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value if isinstance(value, str) else ""


_real_run = subprocess.run
_declared = False  # inside `declared_secret_output()`


@contextlib.contextmanager
def declared_secret_output() -> Iterator[None]:
    """A test whose command prints the test's own fake secrets on purpose (rendering a
    compose file with them filled in) says so here; those outputs are not scanned."""
    global _declared
    _declared = True
    try:
        yield
    finally:
        _declared = False


def _recording_run(*args: Any, **kwargs: Any) -> subprocess.CompletedProcess[Any]:
    result = _real_run(*args, **kwargs)
    if _declared:
        return result
    cmd = result.args if isinstance(result.args, str) else " ".join(map(str, result.args))
    for stream in (result.stdout, result.stderr):
        text = _text(stream)
        if text:
            _outputs.append((f"output of `{cmd[:80]}`", text))
    return result


def known_passwords() -> dict[str, str]:
    from tests.helpers import dispatch, rawclient

    return {"test password (helpers.dispatch)": dispatch.PASSWORD.decode(),
            "test password (helpers.rawclient)": rawclient.PASSWORD.decode()}


def secrets_under(root: Path) -> dict[str, str]:
    """secret value -> what it is, from every .env file under root."""
    found: dict[str, str] = {}
    for env_file in root.rglob(".env"):
        try:
            values = read_env_file(env_file)
        except Exception:  # a test's deliberately broken .env
            continue
        for name in _SECRET_ENV:
            for part in values.get(name, "").split(","):
                if len(part.strip()) >= _MIN_SECRET_LEN:
                    found[part.strip()] = name
    return found


def scan(sources: list[tuple[str, str]], secrets: dict[str, str]) -> list[str]:
    hits = []
    for where, text in sources:
        for secret, kind in secrets.items():
            if secret in text:
                hits.append(f"{kind} appears in {where}")
    return hits


def _log_files(root: Path) -> Iterator[tuple[str, str]]:
    for path in root.rglob("*.log"):
        try:
            if path.is_file() and path.stat().st_size <= _MAX_SCAN_BYTES:
                yield str(path), path.read_text(errors="replace")
        except OSError:
            continue


def pytest_configure(config: pytest.Config) -> None:
    subprocess.run = _recording_run  # type: ignore[assignment]


def pytest_unconfigure(config: pytest.Config) -> None:
    subprocess.run = _real_run


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    for name, content in report.sections:  # captured stdout/stderr/log only
        _outputs.append((f"{item.nodeid} ({name})", content))


@pytest.fixture(scope="session", autouse=True)
def secrets_canary(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    yield
    root = tmp_path_factory.getbasetemp()
    secrets = {**secrets_under(root), **{v: k for k, v in known_passwords().items()}}
    hits = scan(_outputs + list(_log_files(root)), secrets)
    assert not hits, "secrets leaked into logs or command output:\n" + "\n".join(
        sorted(set(hits))[:20])
