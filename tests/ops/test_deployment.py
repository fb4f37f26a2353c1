"""The one deployment loader of qpq-ops (doctor, backup, restore, rotate) on real files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qpq_ops.deployment import load_deployment
from qpq_ops.errors import ConfigInvalid, ConfigUnreadable, Refused
from qpq_server.config import load_config
from tests.helpers.server import init_data_dir


@pytest.fixture(scope="module")
def config_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return init_data_dir(tmp_path_factory.mktemp("deployment") / "data",
                         {"metrics": {"listen": "0.0.0.0:9345"}})


def test_paths_are_the_servers_own(config_path: Path) -> None:
    dep = load_deployment(config_path)
    config = load_config(config_path)
    assert dep.config_path == config_path.resolve()
    assert (dep.data_dir, dep.db_path, dep.tls_cert, dep.pid_file) == (
        config.data_dir, config.db_path, config.tls_cert_path, config.pid_path)
    assert dep.env_file == config_path.resolve().parent / ".env"
    # a wildcard metrics listener is reached over loopback
    assert (dep.metrics_listen, dep.metrics_port) == ("0.0.0.0:9345", 9345)
    assert dep.metrics_url == "http://127.0.0.1:9345"


def test_an_ipv6_metrics_listener_is_bracketed(tmp_path: Path) -> None:
    dep = load_deployment(init_data_dir(tmp_path / "data", {"metrics": {"listen": "[::1]:9346"}}))
    assert dep.metrics_url == "http://[::1]:9346"


def test_the_environment_wins_over_the_env_file(config_path: Path) -> None:
    dep = load_deployment(config_path)
    key = dep.db_key({})
    assert key is not None and key.reveal()  # init wrote one to .env
    assert dep.env_value("QPQ_DB_KEY", {"QPQ_DB_KEY": "from-env"}) == "from-env"


@pytest.mark.parametrize(("text", "error", "message"), [
    (None, ConfigUnreadable, "cannot read {path}: No such file or directory"),
    ("[server\n", ConfigUnreadable, "{path} is not valid TOML: "),
    ("[quic]\nmax_connections = -5\n", ConfigInvalid, "[quic] max_connections must be > 0"),
    ("[nonsense]\n", ConfigInvalid, "unknown section [nonsense]"),
])
def test_unusable_configs_are_one_line_usage_errors(tmp_path: Path, text: str | None,
                                                    error: type[Refused], message: str) -> None:
    path = tmp_path / "qpq-server.toml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(error) as caught:
        load_deployment(path)
    assert message.format(path=path) in str(caught.value)
    assert "\n" not in str(caught.value)
    assert caught.value.exit_code == 64


def test_a_directory_or_an_unreadable_file_cannot_be_read(tmp_path: Path) -> None:
    with pytest.raises(ConfigUnreadable, match="Is a directory"):
        load_deployment(tmp_path)
    if os.geteuid() != 0:  # root reads anything
        path = tmp_path / "qpq-server.toml"
        path.write_text("")
        path.chmod(0)
        with pytest.raises(ConfigUnreadable, match="cannot read"):
            load_deployment(path)
