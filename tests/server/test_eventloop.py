"""QPQ_EVENT_LOOP: uvloop by default when installed, asyncio on request, clear errors."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest
import uvloop

from qpq_server import eventloop
from qpq_server.errors import ConfigError
from tests.helpers.server import BIN, init_data_dir


async def _loop_type() -> type:
    return type(asyncio.get_running_loop())


def test_uvloop_is_the_default_when_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(eventloop.ENV, raising=False)
    assert eventloop.loop_name() == "uvloop"
    assert eventloop.run(_loop_type()) is uvloop.Loop


@pytest.mark.parametrize(("value", "expected"), [("asyncio", "asyncio"), ("UVLOOP", "uvloop"),
                                                 ("auto", "uvloop"), ("", "uvloop")])
def test_the_loop_can_be_chosen(monkeypatch: pytest.MonkeyPatch, value: str,
                                expected: str) -> None:
    monkeypatch.setenv(eventloop.ENV, value)
    assert eventloop.loop_name() == expected
    loop_type = eventloop.run(_loop_type())
    assert (loop_type is uvloop.Loop) == (expected == "uvloop")


def test_an_unknown_loop_is_refused_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="QPQ_EVENT_LOOP='tokio' is not one of auto"):
        eventloop.loop_name("tokio")
    config = init_data_dir(tmp_path / "d")
    result = subprocess.run([str(BIN / "qpq-server"), "run", "--config", str(config)],
                            env={"QPQ_EVENT_LOOP": "tokio", "PATH": ""}, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode != 0
    assert "QPQ_EVENT_LOOP='tokio' is not one of auto, uvloop, asyncio" in result.stderr
    assert "Traceback" not in result.stderr
