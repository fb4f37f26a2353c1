"""docker-compose.prod.yml, .env.example and the Dockerfile."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from qpq_ops.render.settings import DEFAULT_RUNBOOK_BASE_URL
from tests.bundle.conftest import tool
from tests.helpers.canary import declared_secret_output

SECRETS = ("QPQ_AUTH_TOKEN", "QPQ_DB_KEY", "GRAFANA_ADMIN_PASSWORD")


@pytest.fixture(scope="module")
def compose(repo: Path) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((repo / "docker-compose.prod.yml").read_text())
    return data


def _env_example(repo: Path) -> dict[str, str]:
    values = {}
    for line in (repo / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def _project(repo: Path, tmp_path: Path, env: dict[str, str]) -> Path:
    """A copy of the bundle's files, as an operator's checkout, with a .env."""
    project = tmp_path / "qpq"
    project.mkdir()
    shutil.copy(repo / "docker-compose.prod.yml", project)
    shutil.copy(repo / "Dockerfile", project)
    for directory in ("prometheus", "dashboards", "grafana-provisioning"):
        shutil.copytree(repo / directory, project / directory)
    (project / ".env").write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    return project


def _config(project: Path) -> subprocess.CompletedProcess[str]:
    # `config` prints the file with the test's fake secrets filled in: that is its job.
    with declared_secret_output():
        return subprocess.run(
            [tool("docker-compose"), "-f", "docker-compose.prod.yml", "config"],
            cwd=project, capture_output=True, text=True, timeout=60,
        )


def test_docker_compose_config_validates_with_secrets_filled_in(
        repo: Path, tmp_path: Path) -> None:
    env = _env_example(repo) | {k: f"test-{k.lower()}" for k in SECRETS}
    result = _config(_project(repo, tmp_path, env))
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert resolved["services"]["qpq-server"]["environment"]["QPQ_AUTH_TOKEN"] == (
        "test-qpq_auth_token")


@pytest.mark.parametrize("secret", SECRETS)
def test_docker_compose_refuses_an_empty_secret_and_names_it(
        repo: Path, tmp_path: Path, secret: str) -> None:
    env = _env_example(repo) | {k: f"test-{k.lower()}" for k in SECRETS} | {secret: ""}
    result = _config(_project(repo, tmp_path, env))
    assert result.returncode != 0
    assert f"set {secret} in .env" in result.stderr


def test_env_example_documents_every_variable_and_holds_no_secret(
        repo: Path, compose: dict[str, Any]) -> None:
    used = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)",
                          (repo / "docker-compose.prod.yml").read_text()))
    example = _env_example(repo)
    assert used == set(example), (used ^ set(example))
    text = (repo / ".env.example").read_text()
    for key in example:
        assert re.search(rf"^# .*\n{key}=", text, re.M), f"{key} has no comment above it"
    for secret in SECRETS:
        assert example[secret] == "", f"{secret} must be empty in .env.example"


def test_mounted_paths_exist_in_the_repository(repo: Path, compose: dict[str, Any]) -> None:
    mounted = []
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("./"):
                mounted.append(source)
                assert (repo / source).exists(), f"{source} is mounted but missing"
        build = service.get("build")
        if build:
            assert (repo / build["context"] / build["dockerfile"]).is_file()
    assert set(mounted) == {"./prometheus", "./grafana-provisioning", "./dashboards", "./docs"}


def test_grafana_serves_the_runbooks_where_alert_links_point(compose: dict[str, Any]) -> None:
    served = "http://localhost:3000/public/" + next(
        v.split(":")[1].removeprefix("/usr/share/grafana/public/")
        for v in compose["services"]["grafana"]["volumes"] if v.startswith("./docs:"))
    assert served == DEFAULT_RUNBOOK_BASE_URL


def test_server_limits_follow_the_scaling_guide(compose: dict[str, Any]) -> None:
    server = compose["services"]["qpq-server"]
    assert server["ulimits"]["nofile"] == {"soft": 65536, "hard": 65536}
    resources = server["deploy"]["resources"]
    assert resources["limits"] == {"cpus": "4", "memory": "4G"}
    assert resources["reservations"] == {"cpus": "2", "memory": "1G"}
    assert "/readyz" in " ".join(server["healthcheck"]["test"])
    assert server["volumes"] == ["qpq-data:/data"]


def test_only_quic_is_published_and_admin_ports_default_to_loopback(
        compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["qpq-server"]["ports"] == ["${QPQ_PUBLIC_BIND:-0.0.0.0}:7000:7000/udp"]
    assert services["prometheus"]["ports"] == ["${QPQ_ADMIN_BIND:-127.0.0.1}:9091:9091"]
    assert services["grafana"]["ports"] == ["${QPQ_ADMIN_BIND:-127.0.0.1}:3000:3000"]
    assert "--web.listen-address=:9091" in services["prometheus"]["command"]
    assert "ports" not in services["node-exporter"]
    assert services["node-exporter"]["network_mode"] == "service:qpq-server"


def test_secrets_reach_containers_only_from_env_substitution(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for key, value in service.get("environment", {}).items():
            if any(word in key for word in ("TOKEN", "KEY", "PASSWORD")):
                assert str(value).startswith("${") and ":?" in str(value), (name, key)


def test_dockerfile_runs_slim_python_as_non_root_with_a_readyz_healthcheck(repo: Path) -> None:
    text = (repo / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim", text, re.M)
    user = re.findall(r"^USER (\S+)", text, re.M)
    assert user and not user[-1].startswith(("root", "0"))
    assert re.search(r"^HEALTHCHECK .*", text, re.M)
    assert "http://127.0.0.1:9090/readyz" in text
    assert 'VOLUME ["/data"]' in text
    assert "EXPOSE 7000/udp" in text


def test_dockerfile_entrypoint_script_is_valid_shell(repo: Path, tmp_path: Path) -> None:
    """The entrypoint is written by a printf in the Dockerfile: rebuild and sh -n it."""
    text = (repo / "Dockerfile").read_text()
    block = text.split("RUN printf '%s\\n' \\\n", 1)[1].split("> /usr/local/bin/", 1)[0]
    lines = re.findall(r"^  '(.*)' \\$", block, re.M)
    assert lines[0] == "#!/bin/sh" and lines[-1].startswith("exec qpq-server run")
    script = tmp_path / "entrypoint.sh"
    script.write_text("\n".join(lines) + "\n")
    result = subprocess.run(["sh", "-n", str(script)], capture_output=True, text=True,
                            timeout=10)
    assert result.returncode == 0, result.stderr


def test_dockerignore_keeps_secrets_and_the_venv_out_of_the_build(repo: Path) -> None:
    ignored = set((repo / ".dockerignore").read_text().split())
    assert {".env", ".venv", ".git", "data"} <= ignored


def test_entrypoint_initialises_the_data_dir_with_metrics_on_the_container_network(
        repo: Path, tmp_path: Path) -> None:
    """Run the entrypoint up to (not including) `exec qpq-server run`: init, rewrite, check."""
    text = (repo / "Dockerfile").read_text()
    block = text.split("RUN printf '%s\\n' \\\n", 1)[1].split("> /usr/local/bin/", 1)[0]
    lines = re.findall(r"^  '(.*)' \\$", block, re.M)
    script = tmp_path / "entrypoint-init.sh"
    script.write_text("\n".join(lines[:-1]) + "\n")
    config = tmp_path / "data" / "qpq-server.toml"
    bin_dir = str(Path(sys.executable).parent)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "QPQ_CONFIG": str(config), "QPQ_DOMAIN": "example.org"}
    result = subprocess.run(["sh", str(script)], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    settings = tomllib.loads(config.read_text())
    assert settings["metrics"]["listen"] == "0.0.0.0:9090"
    assert settings["server"]["domain"] == "example.org"
    # A second start keeps the existing data dir (no re-init) and still validates.
    again = subprocess.run(["sh", str(script)], env=env, capture_output=True, text=True,
                           timeout=60)
    assert again.returncode == 0, again.stderr
