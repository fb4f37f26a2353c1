"""The secrets canary finds a leak when there is one (and names no secret)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from tests.helpers.canary import scan, secrets_under


def test_canary_finds_a_token_in_a_log_and_names_only_its_kind() -> None:
    # Outside pytest's temp dir: the session-end canary must not see this planted leak.
    with tempfile.TemporaryDirectory() as tmp:
        _planted_leak_is_found(Path(tmp))


def _planted_leak_is_found(tmp_path: Path) -> None:
    token = "tok-" + "a1b2c3d4" * 4
    (tmp_path / "srv").mkdir()
    (tmp_path / "srv" / ".env").write_text(f"QPQ_AUTH_TOKEN={token}\nQPQ_DB_KEY={'ab' * 32}\n")
    (tmp_path / "srv" / "server.log").write_text(f"starting with {token}\n")
    secrets = secrets_under(tmp_path)
    assert set(secrets.values()) == {"QPQ_AUTH_TOKEN", "QPQ_DB_KEY"}
    log = (tmp_path / "srv" / "server.log").read_text()
    hits = scan([("server.log", log), ("clean output", "nothing here")], secrets)
    assert hits == ["QPQ_AUTH_TOKEN appears in server.log"]
    assert token not in hits[0]
