"""`rotate auth-token --token-stdin`: one given token for every node of a cluster."""

from __future__ import annotations

from pathlib import Path

import pytest

from qpq_server.devserver import init_server_dir
from qpq_server.secrets import read_env_file
from tests.backup.support import ops, tree_digest

CLUSTER_TOKEN = "cluster-token-" + "k" * 30


def test_two_nodes_rotate_to_the_same_given_token(tmp_path: Path) -> None:
    fingerprints = []
    for node in ("a", "b"):
        config = init_server_dir(tmp_path / node)
        old = read_env_file(config.parent / ".env")["QPQ_AUTH_TOKEN"]
        result = ops("rotate", "auth-token", "--config", config, "--token-stdin", "--json",
                     stdin=CLUSTER_TOKEN + "\n")
        # No server runs here: exit 1 with the warning that nothing was signalled.
        assert result.exit_code in (0, 1), result.stderr
        env = read_env_file(config.parent / ".env")
        assert env["QPQ_AUTH_TOKEN"] == CLUSTER_TOKEN
        assert env["QPQ_AUTH_TOKEN_PREVIOUS"] == old
        assert CLUSTER_TOKEN not in result.stdout + result.stderr
        fingerprints.append(result.json()["fingerprint"])
    assert fingerprints[0] == fingerprints[1]


@pytest.mark.parametrize(("stdin", "message"), [
    ("", "at least 16 characters"),
    ("short\n", "at least 16 characters"),
    ("has a space in it, long enough\n", "no whitespace"),
    ('quoted"token-0123456789\n', "no whitespace, quotes"),
    ("line-one-0123456789\nline-two-0123456789\n", "one line"),
])
def test_a_bad_token_on_stdin_is_a_usage_error_and_changes_nothing(
        tmp_path: Path, stdin: str, message: str) -> None:
    config = init_server_dir(tmp_path / "d")
    before = tree_digest(config.parent)
    result = ops("rotate", "auth-token", "--config", config, "--token-stdin", stdin=stdin)
    assert result.exit_code == 64
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    for secret in stdin.splitlines():
        assert not secret or secret not in result.stderr
    assert tree_digest(config.parent) == before


def test_the_token_in_use_is_refused(tmp_path: Path) -> None:
    config = init_server_dir(tmp_path / "d")
    current = read_env_file(config.parent / ".env")["QPQ_AUTH_TOKEN"]
    result = ops("rotate", "auth-token", "--config", config, "--token-stdin", stdin=current)
    assert result.exit_code == 64 and "the one in use" in result.stderr


def test_token_stdin_does_not_go_with_finish(tmp_path: Path) -> None:
    config = init_server_dir(tmp_path / "d")
    result = ops("rotate", "auth-token", "--config", config, "--finish", "--token-stdin",
                 stdin=CLUSTER_TOKEN)
    assert result.exit_code == 64 and "--finish" in result.stderr
