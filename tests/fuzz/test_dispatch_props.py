"""Generated and mutated requests through the real dispatch core.

Whatever a request holds, `Dispatcher.handle` answers one well-formed response and
never `internal` (that code means an unexpected exception: a bug), and the server keeps
serving: a fixed probe request still works after every example. Requests carry a real
session token some of the time so that the handlers behind the session check run too.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qpq_server.errors import QpqError
from qpq_server.protocol.codec import FrameDecoder, encode_frame
from tests.fuzz.strategies import mutated, requests
from tests.helpers.syncharness import SyncHarness, sync_harness

SCALE = 20 if os.environ.get("QPQ_SOAK") == "1" else 1


@pytest.fixture(scope="module")
def sh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SyncHarness]:
    with sync_harness(tmp_path_factory.mktemp("dp"), rate_limit={"enabled": False}) as s:
        conn = s.run(s.h.connect())
        s.sessions = [s.run(s.h.session(conn, n)) for n in ("alice", "bob")]  # type: ignore[attr-defined]
        yield s


def _check(sh: SyncHarness, request: dict[str, Any]) -> None:
    conn = sh.run(sh.h.connect())
    response = sh.run(sh.h.dispatcher.handle(request, conn))
    assert isinstance(response, dict) and isinstance(response.get("ok"), bool), response
    if not response["ok"]:
        error = response["error"]
        assert error["code"] != "internal", (request, error)
        assert isinstance(error["message"], str) and len(error["message"]) < 300
    probe = sh.run(sh.h.call(conn, "fetch", session=sh.sessions[1], limit=1))  # type: ignore[attr-defined]
    assert probe["ok"], probe


@settings(max_examples=250 * SCALE, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(requests(), st.booleans())
def test_generated_requests_never_answer_internal(sh: SyncHarness, request: dict[str, Any],
                                                  with_session: bool) -> None:
    if with_session:
        request["session"] = sh.sessions[0]  # type: ignore[attr-defined]
    request.pop("wait_s", None)  # a long-poll would only make the test slow
    _check(sh, request)


@settings(max_examples=250 * SCALE, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.data())
def test_mutated_frames_that_still_decode_never_answer_internal(sh: SyncHarness,
                                                               data: st.DataObject) -> None:
    request = data.draw(requests())
    request["session"] = sh.sessions[0]  # type: ignore[attr-defined]
    raw = data.draw(mutated(encode_frame(request)))
    try:
        frames = FrameDecoder(64 * 1024).feed(raw)
    except QpqError:
        return
    for frame in frames:
        frame.pop("wait_s", None)
        _check(sh, frame)
