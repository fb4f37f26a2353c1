"""Playbooks and roles without running them: syntax, lint, documented variables, handlers."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from qpq_server.config import Config
from tests.ansible.runner import (
    BIN,
    PLAYBOOK_NAMES,
    PLAYBOOKS,
    REPO,
    ROLES,
    ansible_env,
    role_defaults,
)
from tests.host.systemd_host import SUITE

pytestmark = pytest.mark.timeout(240)

ROLE_NAMES = sorted(p.name for p in ROLES.iterdir() if (p / "tasks" / "main.yml").exists())
EXPECTED_ROLES = ["qpq_backup", "qpq_firewall", "qpq_grafana", "qpq_postgres", "qpq_prometheus",
                  "qpq_rotate",
                  "qpq_server",
                  "qpq_sysctl", "qpq_ulimits"]


def argument_specs(role: str) -> dict[str, Any]:
    data = yaml.safe_load((ROLES / role / "meta" / "argument_specs.yml").read_text())
    return dict(data["argument_specs"])


def test_every_role_of_the_issue_exists() -> None:
    assert ROLE_NAMES == EXPECTED_ROLES


@pytest.mark.parametrize("playbook", PLAYBOOK_NAMES)
def test_playbook_passes_syntax_check_with_the_example_inventory(playbook: str,
                                                                 tmp_path: Path) -> None:
    run = subprocess.run(
        [str(BIN / "ansible-playbook"), "-i", str(PLAYBOOKS / "inventory.example.yml"),
         "--syntax-check", str(PLAYBOOKS / playbook)],
        cwd=PLAYBOOKS, env=ansible_env(tmp_path), capture_output=True, text=True, timeout=120,
        check=False)
    assert run.returncode == 0, run.stdout + run.stderr


def test_ansible_lint_production_profile_is_clean(tmp_path: Path) -> None:
    env = ansible_env(tmp_path)
    env["ANSIBLE_HOME"] = str(tmp_path / "ansible-home")
    run = subprocess.run([str(BIN / "ansible-lint"), "--offline", "playbooks/"], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=200, check=False)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "Profile 'production' was required, and it passed" in run.stdout + run.stderr


@pytest.mark.parametrize("role", EXPECTED_ROLES)
def test_role_defaults_and_argument_specs_document_the_same_variables(role: str) -> None:
    defaults = role_defaults(role)
    specs = argument_specs(role)
    assert "main" in specs
    options: dict[str, dict[str, Any]] = {}
    for entry in specs.values():
        for name, spec in entry["options"].items():
            assert options.setdefault(name, spec) == spec, f"{name} differs between entry points"
    optional = {name for name, spec in options.items() if not spec.get("required")}
    assert set(defaults) == optional
    for name in optional:
        assert options[name].get("default") == defaults[name], name
        assert options[name].get("description"), name
        assert options[name].get("type"), name
    # Required variables have no default, but defaults/main.yml still mentions them.
    text = (ROLES / role / "defaults" / "main.yml").read_text()
    for name in set(options) - optional:
        assert f"# {name}: (required)" in text, name


@pytest.mark.parametrize("role", EXPECTED_ROLES)
def test_every_role_variable_carries_the_role_prefix(role: str) -> None:
    names = set(role_defaults(role))
    for entry in argument_specs(role).values():
        names |= set(entry["options"])
    internal = yaml.safe_load((ROLES / role / "vars" / "main.yml").read_text()) or {}
    assert all(name.startswith(role + "_") for name in names), names
    assert all(name.startswith("_" + role + "_") for name in internal), list(internal)


@pytest.mark.parametrize("role", EXPECTED_ROLES)
def test_every_role_checks_its_inputs_first(role: str) -> None:
    tasks = yaml.safe_load((ROLES / role / "tasks" / "main.yml").read_text())
    first = tasks[0]
    if "ansible.builtin.include_tasks" in first:
        # Skipped only where deploy.yml's first play checked this role on this host; every
        # step's tag still runs it (the included tasks carry the include's tags).
        include = first["ansible.builtin.include_tasks"]
        assert include["file"] == "preflight.yml"
        assert include["apply"]["tags"] == first["tags"]
        assert first["when"] == f"'{role}' not in qpq_inputs_checked | default([])"
    else:
        assert first["ansible.builtin.import_tasks"] == "preflight.yml"
    preflight = yaml.safe_load((ROLES / role / "tasks" / "preflight.yml").read_text())
    assert any("ansible.builtin.assert" in task for task in preflight)
    for task in tasks:
        assert role in task["tags"], task["name"]


@pytest.mark.parametrize(("role", "restart_flag"), [
    ("qpq_server", "_qpq_server_restarted"),
    ("qpq_prometheus", "_qpq_prometheus_restarted"),
])
def test_reload_handler_skips_itself_after_a_restart(role: str, restart_flag: str) -> None:
    handlers = yaml.safe_load((ROLES / role / "handlers" / "main.yml").read_text())
    # The service's restart/reload pair comes first (a role may add handlers of other units
    # after it, like qpq_prometheus' node_exporter restart).
    states = [h["ansible.builtin.systemd_service"]["state"] for h in handlers[:2]]
    assert states == ["restarted", "reloaded"]  # restart runs first in a flush
    restart, reload = handlers[:2]
    assert restart["register"] == restart_flag
    assert f"{restart_flag} is not defined or {restart_flag} is skipped" in reload["when"]


def test_config_files_are_written_through_their_checker() -> None:
    validators = []
    for path in ROLES.glob("*/tasks/*.yml"):
        validators += re.findall(r"validate: (.+)", path.read_text())
    joined = "\n".join(validators)
    assert "/qpq-server check-config %s" in joined
    assert "{{ qpq_prometheus_promtool }} check config %s" in joined
    assert "{{ qpq_prometheus_promtool }} check rules %s" in joined


def test_secret_tasks_never_log() -> None:
    text = (ROLES / "qpq_server" / "tasks" / "configure.yml").read_text()
    tasks = yaml.safe_load(text)
    secret = [t for t in tasks if "QPQ_" in json.dumps(t)]
    assert len(secret) == 2
    assert all(t.get("no_log") is True for t in secret)


def test_tuning_roles_call_qpq_ops_and_restate_none_of_its_values(tmp_path: Path) -> None:
    sysctl = json.loads(subprocess.run([str(BIN / "qpq-ops"), "tune", "sysctl", "--json"],
                                       capture_output=True, text=True, check=True,
                                       timeout=60).stdout)
    ulimits = json.loads(subprocess.run([str(BIN / "qpq-ops"), "tune", "ulimits", "--json"],
                                        capture_output=True, text=True, check=True,
                                        timeout=60).stdout)
    assert role_defaults("qpq_sysctl")["qpq_sysctl_conf_path"] == sysctl["file"]
    assert role_defaults("qpq_ulimits")["qpq_ulimits_limits_path"] in ulimits["files"]
    for role, command in (("qpq_sysctl", "sysctl"), ("qpq_ulimits", "ulimits")):
        text = "\n".join(p.read_text() for p in sorted((ROLES / role).rglob("*.yml")))
        assert f"'tune', '{command}'" in text  # the role runs the tool ...
        assert not (ROLES / role / "templates").exists()  # ... and renders nothing itself
        values = [str(v) for v in sysctl["settings"].values()] + [str(ulimits["nofile"])]
        restated = [v for v in values if re.search(rf"\b{v}\b", text)]
        assert not restated, f"{role} restates qpq-ops values {restated}"


def test_example_inventory_has_a_single_node_and_a_multi_node_group(tmp_path: Path) -> None:
    run = subprocess.run([str(BIN / "ansible-inventory"), "-i",
                          str(PLAYBOOKS / "inventory.example.yml"), "--list"],
                         env=ansible_env(tmp_path), capture_output=True, text=True, timeout=60,
                         check=True)
    inventory = json.loads(run.stdout)
    assert len(inventory["single_node"]["hosts"]) == 1
    assert len(inventory["multi_node"]["hosts"]) >= 2
    assert set(inventory["qpq_servers"]["children"]) == {"single_node", "multi_node",
                                                         "federated"}
    assert "single_node" in inventory["qpq_monitoring"]["children"]
    for host in inventory["multi_node"]["hosts"] + inventory["single_node"]["hosts"]:
        assert inventory["_meta"]["hostvars"][host]["qpq_server_domain"]


def test_readme_shows_the_command_of_every_playbook() -> None:
    readme = (PLAYBOOKS / "README.md").read_text()
    for playbook in PLAYBOOK_NAMES:
        assert re.search(rf"ansible-playbook -i \S+ {re.escape(playbook)}", readme), playbook


_TOML_LINE = re.compile(r"^(?P<key>[a-z_]+) = \{\{ (?P<expr>[^}]*) \}\}$")
_ROLE_VAR = re.compile(r"\bqpq_server_[a-z0-9_]+\b")


def _rendered_default(expr: str, value: Any) -> Any:
    """What the template's filter makes of a role default (int, float, bool, string)."""
    if "| int" in expr:
        return int(value)
    if "| float" in expr:
        return float(value)
    if "| bool" in expr:
        return bool(value)
    return value


def test_qpq_server_role_defaults_are_the_servers_own_config_defaults() -> None:
    """Each [section] key the role renders from one of its defaults carries the value the
    server would use without it (qpq_server/config.py dataclasses): a changed default in
    either place fails here instead of silently diverging on deployed hosts."""
    server = Config(base_dir=Path("."))
    defaults = role_defaults("qpq_server")
    template = (ROLES / "qpq_server" / "templates" / "qpq-server.toml.j2").read_text()
    section, compared, mismatches = "", [], []
    for line in template.splitlines():
        if header := re.fullmatch(r"\[(\w+)\]", line):
            section = header.group(1)
            continue
        match = _TOML_LINE.match(line)
        if not match:
            continue
        names = set(_ROLE_VAR.findall(match["expr"]))
        if len(names) != 1:  # derived from several variables (federation domain): a choice
            continue
        name = names.pop()
        if name not in defaults or "{{" in str(defaults[name]):
            continue  # required (domain) or itself derived
        server_default = getattr(getattr(server, section), match["key"])
        role_default = _rendered_default(match["expr"], defaults[name])
        compared.append(f"[{section}] {match['key']}")
        if role_default != server_default:
            mismatches.append(f"[{section}] {match['key']}: role {name}={defaults[name]!r}, "
                              f"server default {server_default!r}")
    assert not mismatches, "\n".join(mismatches)
    assert len(compared) >= 20, compared


@pytest.mark.parametrize("role", EXPECTED_ROLES)
def test_role_metadata_lists_only_the_platform_the_host_tests_prove(role: str) -> None:
    meta = yaml.safe_load((ROLES / role / "meta" / "main.yml").read_text())
    assert meta["galaxy_info"]["platforms"] == [{"name": "Debian", "versions": [SUITE]}]
