"""A real server on the file backend: messages round-trip, survive a restart, and a
second server on the same data dir is refused with one clear line."""

from __future__ import annotations

import os
import socket
import subprocess
import tomllib
from pathlib import Path

import tomli_w

from qpq_server.client import QpqClient
from qpq_server.devserver import BIN, free_port, running_server, start_server


async def test_file_backend_server_delivers_across_restart_and_refuses_a_second_server(
        tmp_path: Path) -> None:
    with running_server(tmp_path, overrides={"storage": {"backend": "file"},
                                             "rate_limit": {"enabled": False}}) as srv:
        async with srv.connect() as conn:
            c = QpqClient(conn, tmp_path / "profiles")
            await c.register("fa", "pw")
            await c.register("fb", "pw")
            await c.send_text("fa", ["fb"], "first")
            assert [m.text for m in await c.receive("fb")] == ["first"]
            await c.send_text("fa", ["fb"], "kept over a restart")
        assert not (srv.data_dir / "qpq.db").exists()  # no database at all
        queued = list((srv.data_dir / "store" / "queues" / "u-fb").iterdir())
        assert len(queued) == 1 and b"kept over a restart" not in queued[0].read_bytes()

        second_config = tmp_path / "second.toml"
        config = tomllib.loads(srv.config_path.read_text())
        config["server"]["data_dir"] = str(srv.data_dir)
        for key in ("tls_cert", "tls_key"):
            config["server"][key] = str(srv.data_dir / config["server"][key])
        config["server"]["listen"] = f"127.0.0.1:{free_port(socket.SOCK_DGRAM)}"
        config["metrics"]["listen"] = f"127.0.0.1:{free_port()}"
        second_config.write_text(tomli_w.dumps(config))
        (tmp_path / ".env").write_text((srv.data_dir / ".env").read_text())
        env = {k: v for k, v in os.environ.items() if not k.startswith("QPQ_")}
        second = subprocess.run([str(BIN / "qpq-server"), "run", "--config", str(second_config)],
                                capture_output=True, text=True, timeout=30, env=env)
        assert second.returncode == 1
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and "in use by another qpq-server" in lines[0], second.stderr

        srv.stop()
        srv = start_server(srv.config_path)
        try:
            async with srv.connect() as conn:
                c = QpqClient(conn, tmp_path / "profiles")
                assert [m.text for m in await c.receive("fb")] == ["kept over a restart"]
                await c.kt.lookup("fa")  # the KT log came back too
        finally:
            srv.stop()
