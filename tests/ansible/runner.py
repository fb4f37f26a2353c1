"""Run the real playbooks with `ansible-playbook` against localhost, into a temporary root.

The roles take `qpq_root` (every managed path is written below it) and
`qpq_service_manager: none` (no systemctl), so a deploy here never touches the real host.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from qpq_server.client import QpqConnection
from qpq_server.devserver import RunningServer, free_port, start_server

REPO = Path(__file__).resolve().parents[2]
PLAYBOOKS = REPO / "playbooks"
ROLES = PLAYBOOKS / "roles"
BIN = Path(sys.executable).parent
PLAYBOOK_NAMES = ("deploy.yml", "backup.yml", "restore.yml", "rotate-keys.yml")
AUTH_TOKEN = "test-token-0123456789abcdefghijklmnopqrstuv"
GRAFANA_PASSWORD = "grafana-test-password-0123"

_RECAP = re.compile(
    r"^(?P<host>\S+)\s*:\s*ok=(?P<ok>\d+)\s+changed=(?P<changed>\d+)\s+"
    r"unreachable=(?P<unreachable>\d+)\s+failed=(?P<failed>\d+)\s+skipped=(?P<skipped>\d+)",
    re.MULTILINE,
)


@dataclass(frozen=True)
class PlaybookRun:
    rc: int
    output: str
    recap: Mapping[str, int]

    @property
    def changed(self) -> int:
        return self.recap.get("changed", -1)

    def task_headers(self) -> list[str]:
        """Each task run, in order, as `TASK [role : name]` (a task run twice is here twice)."""
        return [_task_header(line) for line in self.output.splitlines()
                if line.startswith("TASK [")]

    def changed_tasks(self) -> list[str]:
        """Task headers followed by a `changed:` line, for failure messages."""
        names: list[str] = []
        task = ""
        for line in self.output.splitlines():
            if line.startswith("TASK ["):
                task = _task_header(line)
            elif line.startswith("changed:") and task not in names:
                names.append(task)
        return names


def _task_header(line: str) -> str:
    return line.split("]", maxsplit=1)[0] + "]"


# A private cache of the bytecode of Ansible's zipped module code (see zipcode/sitecustomize.py).
ZIPCODE_DIR = Path(__file__).resolve().parent / "zipcode"
ZIPCODE_CACHE = REPO / ".pytest_cache" / "ansible-zipcode"


def zipcode_env(cache: Path | str) -> dict[str, str]:
    """The variables that turn that cache on, in `cache`, for Ansible and its modules (the
    systemd host's sudo keeps exactly these)."""
    return {"PYTHONPATH": str(ZIPCODE_DIR), "QPQ_TEST_ZIPCODE_CACHE": str(cache)}


def ansible_env(work: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QPQ_", "ANSIBLE_"))}
    ZIPCODE_CACHE.mkdir(mode=0o700, parents=True, exist_ok=True)
    env.update(
        zipcode_env(ZIPCODE_CACHE),
        ANSIBLE_CONFIG=str(PLAYBOOKS / "ansible.cfg"),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_FORCE_COLOR="0",
        ANSIBLE_LOCAL_TEMP=str(work / "ansible-local"),
        ANSIBLE_REMOTE_TEMP=str(work / "ansible-remote"),
        ANSIBLE_RETRY_FILES_ENABLED="0",
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}",
    )
    return env


# How every inventory host here is reached: this machine, run with this interpreter.
LOCAL_HOST: Mapping[str, str] = {"ansible_connection": "local",
                                 "ansible_python_interpreter": sys.executable}
# group -> host name -> that host's variables
Groups = Mapping[str, Mapping[str, Mapping[str, Any]]]


def write_inventory(path: Path, servers: Sequence[str] = ("localhost",),
                    host_vars: Mapping[str, Mapping[str, Any]] | None = None,
                    groups: Groups | None = None) -> Path:
    """localhost in both groups the playbooks act on, run with this interpreter.

    More `servers` are more names for this same machine (connection local), for the
    playbooks' multi-host guards; `host_vars` gives one of them its own variables (extra
    vars would override them, so per-host values such as qpq_root go only here).
    `groups` replaces both with groups of its own (each host gets LOCAL_HOST too).
    """
    if groups is None:
        groups = {"qpq_servers": {name: (host_vars or {}).get(name, {}) for name in servers},
                  "qpq_monitoring": {"localhost": {}}}
    inventory = {"all": {"children": {
        group: {"hosts": {name: {**LOCAL_HOST, **own} for name, own in hosts.items()}}
        for group, hosts in groups.items()}}}
    path.write_text(yaml.safe_dump(inventory))
    return path


def run_playbook(playbook: str, work: Path, extra_vars: Mapping[str, Any], *,
                 check: bool = False, tags: str | None = None,
                 servers: Sequence[str] = ("localhost",),
                 host_vars: Mapping[str, Mapping[str, Any]] | None = None,
                 groups: Groups | None = None,
                 timeout: float = 600.0) -> PlaybookRun:
    """One `ansible-playbook` run; extra vars go in as JSON so types survive.

    `playbook` is one of playbooks/, or an absolute path (a test's own playbook, which
    finds the roles through playbooks/ansible.cfg). The inventory: see write_inventory.
    """
    work.mkdir(parents=True, exist_ok=True)
    inventory = write_inventory(work / "inventory.yml", servers, host_vars, groups)
    vars_file = work / "extra-vars.json"
    vars_file.write_text(json.dumps(dict(extra_vars)))
    # From the repository root, as the issue spells it: `ansible-playbook -i INV playbooks/X.yml`.
    path = playbook if Path(playbook).is_absolute() else f"playbooks/{playbook}"
    cmd = [str(BIN / "ansible-playbook"), "-i", str(inventory), path, "-e", f"@{vars_file}"]
    if check:
        cmd.append("--check")
    if tags:
        cmd += ["--tags", tags]
    proc = subprocess.run(cmd, cwd=REPO, env=ansible_env(work), capture_output=True,
                          text=True, timeout=timeout, check=False)
    return parse_run(proc.returncode, proc.stdout + proc.stderr)


def parse_run(rc: int, output: str) -> PlaybookRun:
    """An ansible-playbook run from its exit code and output (the recap summed over hosts)."""
    recap: dict[str, int] = {}
    for match in _RECAP.finditer(output):
        for key in ("ok", "changed", "unreachable", "failed", "skipped"):
            recap[key] = recap.get(key, 0) + int(match.group(key))
    return PlaybookRun(rc=rc, output=output, recap=recap)


def build_wheelhouse(dest: Path) -> Path:
    """Build the qpq wheel and all its dependencies once; returns the qpq wheel.

    Sources are copied out first so parallel test workers never share a build dir.
    """
    src = dest / "src"
    src.mkdir(parents=True, exist_ok=True)
    for name in ("pyproject.toml", "README.md"):
        if (REPO / name).exists():
            shutil.copy2(REPO / name, src / name)
    for package in ("qpq_server", "qpq_ops"):
        shutil.copytree(REPO / package, src / package, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    wheels = dest / "wheels"
    # With the fast extra (uvloop), which the qpq_server role installs by default.
    subprocess.run([str(BIN / "pip"), "wheel", "-q", "--disable-pip-version-check",
                    "-w", str(wheels), f"{src}[fast]"],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = wheels.glob("qpq-*.whl")
    return wheel


def fake_proc(root: Path, settings: Mapping[str, int]) -> Path:
    """A proc tree whose sys/ holds the given kernel values (as if already applied)."""
    for name, value in settings.items():
        path = root / "sys" / name.replace(".", "/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{value}\n")
    return root


def role_defaults(role: str) -> dict[str, Any]:
    data = yaml.safe_load((ROLES / role / "defaults" / "main.yml").read_text())
    return dict(data or {})


def deploy_vars(root: Path, proc: Path, wheel: Path) -> dict[str, Any]:
    """Everything deploy.yml needs to run into `root` on this machine."""
    return {
        "qpq_root": str(root),
        "qpq_service_manager": "none",
        "ansible_become": False,
        "qpq_sysctl_proc_root": str(proc),
        "qpq_server_domain": "chat.example.org",
        "qpq_server_python": sys.executable,
        "qpq_server_wheel": str(wheel),
        # --no-compile: byte-compiling the whole 450 MB venv was two thirds of pip's time in
        # every deploy; the tests start the server, which compiles what it imports. The
        # systemd-host test (tests/host) installs with the role's defaults, compiling.
        "qpq_server_pip_extra_args": f"--no-index --find-links {wheel.parent} --no-compile",
        "qpq_server_listen": f"127.0.0.1:{free_port(socket.SOCK_DGRAM)}",
        "qpq_server_metrics_listen": f"127.0.0.1:{free_port()}",
        "qpq_server_auth_token": AUTH_TOKEN,
        "qpq_prometheus_install_packages": False,
        "qpq_grafana_install": False,
        "qpq_grafana_admin_password": GRAFANA_PASSWORD,
    }


class DeployedServer:
    """The DEPLOYED install (its venv, config and .env) run as a process, like systemd would."""

    def __init__(self, root: Path, metrics_listen: str, log_path: Path,
                 server_name: str = "chat.example.org") -> None:
        self.root = root
        self.metrics_url = "http://" + metrics_listen
        self.log_path = log_path
        self.server_name = server_name
        self.running: RunningServer | None = None

    @property
    def config(self) -> Path:
        return self.root / "var/lib/qpq/qpq-server.toml"

    def start(self, timeout: float = 30.0) -> None:
        self.running = start_server(
            self.config, executable=self.root / "opt/qpq/venv/bin/qpq-server",
            base_env={"PATH": "/usr/bin:/bin"}, log_path=self.log_path,
            server_name=self.server_name, ready_timeout=timeout)

    def connect(self, token: str, ca: Path | None = None,
                ) -> AbstractAsyncContextManager[QpqConnection]:
        """A client of the running deployed server (its own CA unless `ca` is given)."""
        assert self.running is not None, "DeployedServer.connect() before start()"
        return self.running.connect(token, ca=ca)

    def ready(self) -> bool:
        try:
            return httpx.get(self.metrics_url + "/readyz", timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        if self.running is not None:
            self.running.stop()
        self.running = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""


def read_env(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip().strip('"')
    return values
