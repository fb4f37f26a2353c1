"""`qpq-server init --join`: a new node of a PostgreSQL cluster, or one clear refusal."""

from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path

from qpq_server.datadir import session_key_path
from qpq_server.secrets import read_env_file, write_env_file
from tests.helpers.server import BIN, init_data_dir


def qpq_init(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "qpq-server"), "init", *args], capture_output=True,
                          text=True, timeout=60)


def test_join_copies_the_cluster_secrets_and_makes_its_own_certificate(tmp_path: Path) -> None:
    init_data_dir(tmp_path / "a", {"storage": {"backend": "postgres", "pool_size": 7},
                                   "server": {"domain": "chat.example"}})
    env = read_env_file(tmp_path / "a" / ".env")
    write_env_file(tmp_path / "a" / ".env", {**env, "QPQ_DATABASE_URL": "postgresql://db/qpq"})
    done = qpq_init("--data-dir", str(tmp_path / "b"), "--join", str(tmp_path / "a"))
    assert done.returncode == 0, done.stderr
    a, b = tmp_path / "a", tmp_path / "b"
    assert read_env_file(b / ".env") == read_env_file(a / ".env")
    for rel in ("kt/signing_key.pem", str(session_key_path(Path()))):
        assert (b / rel).read_bytes() == (a / rel).read_bytes(), rel
        assert (b / rel).stat().st_mode & 0o077 == 0, rel
    assert sorted(p.name for p in (b / "opaque").iterdir()) == sorted(
        p.name for p in (a / "opaque").iterdir())
    assert (b / "tls" / "cert.pem").read_bytes() != (a / "tls" / "cert.pem").read_bytes()
    config = tomllib.loads((b / "qpq-server.toml").read_text())
    assert config["storage"] == {"backend": "postgres", "pool_size": 7}
    assert config["server"]["domain"] == "chat.example" and config["server"]["data_dir"] == "."
    checked = subprocess.run([str(BIN / "qpq-server"), "check-config",
                              str(b / "qpq-server.toml")], capture_output=True, text=True,
                             timeout=60)
    assert checked.returncode == 0, checked.stderr


def test_join_refuses_a_node_without_a_shared_database(tmp_path: Path) -> None:
    init_data_dir(tmp_path / "a")  # sqlcipher: its database is its own
    done = qpq_init("--data-dir", str(tmp_path / "b"), "--join", str(tmp_path / "a"))
    assert done.returncode == 1
    assert 'join only a node with backend = "postgres"' in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "b").exists()


def test_join_refuses_a_directory_that_is_not_a_data_dir(tmp_path: Path) -> None:
    done = qpq_init("--data-dir", str(tmp_path / "b"), "--join", str(tmp_path))
    assert done.returncode == 1 and "not a qpq data dir" in done.stderr
    assert "Traceback" not in done.stderr
