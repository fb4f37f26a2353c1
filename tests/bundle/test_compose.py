"""docker-compose.prod.yml, .env.example and the Dockerfile."""

from __future__ import annotations

import re
import shutil
import stat
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from qpq_ops.render.settings import DEFAULT_RUNBOOK_BASE_URL
from qpq_server.secrets import read_env_file
from tests.bundle.conftest import tool
from tests.helpers.canary import declared_secret_output

# Compose secrets (files under QPQ_SECRETS_DIR, mounted at /run/secrets/NAME), by service.
SECRET_FILES = {"qpq-server": ("qpq_auth_token", "qpq_db_key"),
                "grafana": ("grafana_admin_password",)}


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
    secrets = project / "secrets"
    secrets.mkdir(mode=0o700)
    for name in (n for names in SECRET_FILES.values() for n in names):
        (secrets / name).write_text(f"test-{name}\n")
    return project


def _config(project: Path) -> subprocess.CompletedProcess[str]:
    # `config` prints the file with the test's fake secrets filled in: that is its job.
    with declared_secret_output():
        return subprocess.run(
            [tool("docker-compose"), "-f", "docker-compose.prod.yml", "config"],
            cwd=project, capture_output=True, text=True, timeout=60,
        )


def test_docker_compose_config_validates_with_secret_files_and_no_secret_environment(
        repo: Path, tmp_path: Path) -> None:
    env = _env_example(repo) | {"QPQ_DOMAIN": "chat.example.org"}
    project = _project(repo, tmp_path, env)
    result = _config(project)
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert {name: Path(spec["file"]) for name, spec in resolved["secrets"].items()} == {
        name: project / "secrets" / name for names in SECRET_FILES.values() for name in names}
    for service, names in SECRET_FILES.items():
        mounted = [s if isinstance(s, str) else s["source"]
                   for s in resolved["services"][service]["secrets"]]
        assert sorted(mounted) == sorted(names)
    assert "test-qpq_auth_token" not in result.stdout  # files, not values, in the config
    server_env = resolved["services"]["qpq-server"]["environment"]
    assert server_env == {"QPQ_DOMAIN": "chat.example.org"}


def test_docker_compose_refuses_to_start_without_a_domain(repo: Path, tmp_path: Path) -> None:
    result = _config(_project(repo, tmp_path, _env_example(repo) | {"QPQ_DOMAIN": ""}))
    assert result.returncode != 0
    assert "set QPQ_DOMAIN in .env" in result.stderr


@pytest.mark.parametrize("service", ["qpq-netns", "qpq-server", "qpq-backup", "node-exporter",
                                     "prometheus", "grafana"])
def test_every_container_is_locked_down(compose: dict[str, Any], service: str) -> None:
    spec = compose["services"][service]
    assert spec["read_only"] is True
    assert spec["cap_drop"] == ["ALL"] and "cap_add" not in spec
    assert "no-new-privileges:true" in spec["security_opt"]
    assert any(t.startswith("/tmp") for t in spec["tmpfs"])
    assert spec["logging"]["options"]["max-size"]
    assert "privileged" not in spec


@pytest.mark.parametrize("service", ["qpq-server", "prometheus", "grafana"])
def test_services_with_an_http_endpoint_have_a_healthcheck(
        compose: dict[str, Any], service: str) -> None:
    test = " ".join(compose["services"][service]["healthcheck"]["test"])
    assert "http://127.0.0.1:" in test


def test_env_example_documents_every_variable_and_holds_no_secret(
        repo: Path, compose: dict[str, Any]) -> None:
    # $${...} is a literal ${...} for the shell inside a container, not compose's.
    used = set(re.findall(r"(?<!\$)\$\{([A-Z_][A-Z0-9_]*)",
                          (repo / "docker-compose.prod.yml").read_text()))
    example = _env_example(repo)
    assert used == set(example), (used ^ set(example))
    text = (repo / ".env.example").read_text()
    for key in example:
        assert re.search(rf"^# .*\n{key}=", text, re.M), f"{key} has no comment above it"
    assert not {k for k in example if any(w in k for w in ("TOKEN", "KEY", "PASSWORD"))}
    assert example["QPQ_DOMAIN"] == ""  # required: no silent localhost


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
    # Published by the namespace holder, which qpq-server joins (see the next test).
    assert services["qpq-netns"]["ports"] == ["${QPQ_PUBLIC_BIND:-0.0.0.0}:7000:7000/udp"]
    assert "ports" not in services["qpq-server"]
    assert services["prometheus"]["ports"] == ["${QPQ_ADMIN_BIND:-127.0.0.1}:9091:9091"]
    assert services["grafana"]["ports"] == ["${QPQ_ADMIN_BIND:-127.0.0.1}:3000:3000"]
    assert "--web.listen-address=:9091" in services["prometheus"]["command"]
    assert "ports" not in services["node-exporter"]


def test_no_secret_travels_as_environment(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for key, value in service.get("environment", {}).items():
            if any(word in key for word in ("TOKEN", "KEY", "PASSWORD")):
                # Only a pointer to a mounted secret file (Grafana's *__FILE convention).
                assert key.endswith("__FILE") and str(value).startswith("/run/secrets/"), \
                    (name, key)


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
    assert {".env", ".venv", ".git", "data", "secrets"} <= ignored


def test_git_never_tracks_the_compose_secrets(repo: Path) -> None:
    ignored = set((repo / ".gitignore").read_text().split())
    assert {"/secrets/", "/.env"} <= ignored


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
    secrets = tmp_path / "run-secrets"
    secrets.mkdir()
    (secrets / "qpq_auth_token").write_text("compose-secret-token-0123456789\n")
    (secrets / "qpq_db_key").write_text("ab" * 32 + "\n")
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "QPQ_CONFIG": str(config),
           "QPQ_DOMAIN": "example.org", "QPQ_SECRETS_DIR": str(secrets)}
    result = subprocess.run(["sh", str(script)], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    settings = tomllib.loads(config.read_text())
    assert settings["metrics"]["listen"] == "0.0.0.0:9090"
    assert settings["server"]["domain"] == "example.org"
    # The mounted secret files, not init's random ones, are in the .env the server reads.
    written = read_env_file(config.parent / ".env")
    assert written["QPQ_AUTH_TOKEN"] == "compose-secret-token-0123456789"
    assert written["QPQ_DB_KEY"] == "ab" * 32
    assert stat.S_IMODE((config.parent / ".env").stat().st_mode) == 0o600
    # A replaced secret file reaches the .env on the next start.
    (secrets / "qpq_auth_token").write_text("replaced-secret-token-0123456789\n")
    # A second start keeps the existing data dir (no re-init) and still validates.
    again = subprocess.run(["sh", str(script)], env=env, capture_output=True, text=True,
                           timeout=60)
    assert again.returncode == 0, again.stderr
    assert read_env_file(config.parent / ".env")["QPQ_AUTH_TOKEN"] == (
        "replaced-secret-token-0123456789")
