"""The README's "Talk to it" block runs as written, against a real server on loopback
(only its address is swapped for the test server's free port)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

from qpq_server.devserver import BIN, running_server

REPO = Path(__file__).resolve().parents[2]


def talk_to_it_block() -> str:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Talk to it", 1)[1]
    match = re.search(r"```sh\n(.*?)```", section, re.S)
    assert match, "README has no sh block under 'Talk to it'"
    return match.group(1)


def test_readme_client_commands_run_as_written(tmp_path: Path) -> None:
    block = talk_to_it_block()
    assert ".venv/bin/qpq-client" in block and "127.0.0.1:7000" in block
    with running_server(tmp_path) as srv:
        (tmp_path / "data").symlink_to(srv.data_dir)
        (tmp_path / ".venv").symlink_to(BIN.parent)
        (tmp_path / "report.pdf").write_bytes(b"%PDF quarterly")
        script = "set -eu\n" + block.replace("127.0.0.1:7000", srv.address)
        env = {k: v for k, v in os.environ.items() if not k.startswith("QPQ_")}
        env.update(HOME=str(tmp_path), XDG_DATA_HOME=str(tmp_path / "share"))
        result = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True,
                                text=True, timeout=180, env=env, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout + result.stderr
    received = [json.loads(line) for line in result.stdout.splitlines()
                if line.startswith("{")]
    assert [(r["from"], r["text"]) for r in received] == [("alice", "hello bob")]
    assert (tmp_path / "Downloads" / "report.pdf").read_bytes() == b"%PDF quarterly"
    assert (tmp_path / "share" / "qpq-client" / "alice.keys").stat().st_mode & 0o777 == 0o600
