"""Pure parts: session tokens, rate limiter, config validation, secrets handling."""

from __future__ import annotations

from pathlib import Path

import pytest

from qpq_server.auth.access import AccessTokens
from qpq_server.auth.sessions import SessionSigner
from qpq_server.errors import InvalidSession
from qpq_server.ratelimit import RateLimiter
from qpq_server.secrets import Secret, load_secrets


def test_a_session_bound_to_a_device_says_which_and_an_account_wide_one_none() -> None:
    signer = SessionSigner(b"k" * 32, ttl_s=60)
    bound, _ = signer.issue("bob", 100.0, "0123456789abcdef")
    assert signer.verify(bound, 110.0).device == "0123456789abcdef"
    wide, _ = signer.issue("bob", 100.0)
    assert signer.verify(wide, 110.0).device == ""
    mac = bound.split(".")[1]
    with pytest.raises(InvalidSession):  # the device is under the MAC too
        signer.verify(wide.split(".")[0] + "." + mac, 110.0)


def test_session_token_verifies_until_expiry_and_rejects_tampering() -> None:
    signer = SessionSigner(b"k" * 32, ttl_s=60)
    token, expires = signer.issue("alice", now=1000.0)
    assert expires == 1060.0
    assert signer.verify(token, now=1059.0).username == "alice"
    with pytest.raises(InvalidSession, match="expired"):
        signer.verify(token, now=1060.0)
    body, mac = token.split(".")
    with pytest.raises(InvalidSession):
        signer.verify(body + "." + mac[::-1], now=1000.0)
    with pytest.raises(InvalidSession):
        SessionSigner(b"x" * 32, ttl_s=60).verify(token, now=1000.0)
    with pytest.raises(InvalidSession):
        signer.verify("not-a-token", now=1000.0)


def test_token_bucket_allows_burst_then_refills() -> None:
    limiter = RateLimiter(rate=2.0, burst=3)
    assert [limiter.allow("a", 0.0) for _ in range(4)] == [True, True, True, False]
    assert limiter.allow("b", 0.0)  # other keys have their own bucket
    assert limiter.allow("a", 0.5)  # one token back after 0.5 s at 2/s
    assert not limiter.allow("a", 0.5)


def test_rate_limiter_memory_is_bounded() -> None:
    limiter = RateLimiter(rate=1.0, burst=1, max_entries=100)
    for i in range(1000):
        limiter.allow(f"10.0.{i}", 0.0)
    assert len(limiter) == 100


def test_access_tokens_accept_current_and_previous_only() -> None:
    tokens = AccessTokens([Secret("new"), Secret("old")])
    assert tokens.check("new") and tokens.check("old")
    assert not tokens.check("other") and not tokens.check("")
    tokens.replace([Secret("new")])
    assert not tokens.check("old")
    assert "new" not in repr(tokens)


def test_secrets_never_appear_in_repr(tmp_path: Path) -> None:
    env = tmp_path / ".env"
    env.write_text("QPQ_AUTH_TOKEN=tok-123\nQPQ_DB_KEY=key-456\n")
    loaded = load_secrets(env, environ={})
    assert "tok-123" not in repr(loaded) and "key-456" not in repr(loaded)
    assert loaded.auth_tokens[0].reveal() == "tok-123"


def test_environment_wins_over_env_file(tmp_path: Path) -> None:
    env = tmp_path / ".env"
    env.write_text("QPQ_AUTH_TOKEN=file\nQPQ_DB_KEY=k\n")
    loaded = load_secrets(env, environ={"QPQ_AUTH_TOKEN": "envtok", "QPQ_AUTH_TOKEN_PREVIOUS": "p"})
    assert [t.reveal() for t in loaded.auth_tokens] == ["envtok", "p"]
