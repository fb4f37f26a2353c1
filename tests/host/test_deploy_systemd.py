"""deploy.yml on a real Debian 12 host under systemd: what an operator's first day looks like.

One host is booted for the module and deployed in order: `--check --diff` while it is
fresh, the deploy, a second deploy by a non-root sudo user (changed=0); then each test
drives the running host.
The tests run in file order and share that host.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from qpq_server.client import QpqClient, connect
from qpq_server.tls import write_self_signed
from tests.ansible.runner import (
    AUTH_TOKEN,
    BIN,
    PLAYBOOKS,
    REPO,
    ZIPCODE_DIR,
    PlaybookRun,
    parse_run,
    zipcode_env,
)
from tests.helpers.ports import free_port
from tests.host.systemd_host import SystemdHost

pytestmark = pytest.mark.timeout(900)

WORK = "/srv/qpq-test"  # inventory and extra vars, inside the host
UNIT = "qpq-server.service"
DATA = "/var/lib/qpq"
ACME_HOOK = "/etc/letsencrypt/renewal-hooks/deploy/qpq-server"
# The operator's account for the redeploy: not root, `become: true` through sudo.
DEPLOYER = "deployer"
# rsync's off-host copy target, a local path here (a mounted share on a real host).
OFFHOST = "/srv/qpq-offhost"
# The clock belongs to this machine (one kernel): timesyncd runs in the host but may not
# set it. The empty Condition resets the unit's "not in a container" conditions.
TIMESYNCD_GUARD = """\
[Unit]
ConditionVirtualization=
[Service]
CapabilityBoundingSet=
AmbientCapabilities=
SystemCallFilter=~@clock
SystemCallErrorNumber=EPERM
"""
# The target for `systemd-analyze security` (lower is more locked down).
MAX_EXPOSURE = 2.0
# The playbook tests' cache of the bytecode of Ansible's zipped module code
# (tests/ansible/zipcode/sitecustomize.py): each module task is a fresh interpreter that
# compiles ansible.module_utils from a zip again otherwise. Module code runs as root through
# become in both deploys (the controller's own imports come from the venv's .pyc files), so
# the cache is root's, private, and inside the host: the checkout is bound read-only.
ZIPCODE_CACHE = "/var/cache/qpq-test-zipcode"
# sudo resets the environment: the become step keeps the two variables the cache needs.
ZIPCODE_SUDOERS = f'Defaults env_keep += "{" ".join(zipcode_env(ZIPCODE_CACHE))}"\n'
# What deploy.yml's roles (qpq_server, qpq_sysctl, qpq_ulimits, qpq_backup, qpq_firewall,
# node_exporter) create on a fresh host with the vars below: none may exist after the check
# run, all after the deploy (so this list cannot go stale unnoticed).
DEPLOY_PATHS = (
    "/opt/qpq", DATA, "/var/lib/qpq-backup", "/var/backups/qpq", OFFHOST, ACME_HOOK,
    f"/etc/systemd/system/{UNIT}", f"/etc/systemd/system/{UNIT}.d/limits.conf",
    "/etc/systemd/system/qpq-backup.service", "/etc/systemd/system/qpq-backup.timer",
    "/etc/systemd/journald.conf.d/60-qpq.conf", "/etc/sysctl.d/99-qpq.conf",
    "/etc/security/limits.d/99-qpq.conf", "/etc/nftables.d/qpq.nft",
)


def run_playbook(host: SystemdHost, playbook: str, extra_vars: Mapping[str, Any], *,
                 check: bool = False, tags: str | None = None, timeout: float = 600.0,
                 user: str = "root") -> PlaybookRun:
    """`ansible-playbook` inside the host, connection local, from this checkout's venv.

    As `user` (another account than root: the plays' `become: true` goes through sudo)."""
    work = host.path(WORK)
    work.mkdir(parents=True, exist_ok=True)
    (work / "extra-vars.json").write_text(json.dumps(dict(extra_vars)))
    cmd = [str(BIN / "ansible-playbook"), "-i", f"{WORK}/inventory.yml",
           f"playbooks/{playbook}", "-e", f"@{WORK}/extra-vars.json"]
    if check:
        cmd += ["--check", "--diff"]
    if tags:
        cmd += ["--tags", tags]
    # The host's own PATH: this venv's bin/ on it would make the role's `python3` this
    # venv's interpreter, which the service account cannot reach. Bytecode writing stays on
    # (this machine's PYTHONDONTWRITEBYTECODE was copied in at first): the bound checkout and
    # venv are read-only anyway, and the host's own Python writes only into its throwaway root.
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
           "ANSIBLE_CONFIG": str(PLAYBOOKS / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1",
           "ANSIBLE_LOCAL_TEMP": "/tmp/ansible-local" + ("" if user == "root" else f"-{user}"),
           "ANSIBLE_REMOTE_TEMP": "/tmp/ansible-remote" + ("" if user == "root" else f"-{user}"),
           "ANSIBLE_RETRY_FILES_ENABLED": "0", **zipcode_env(ZIPCODE_CACHE)}
    if user != "root":
        env |= {"HOME": f"/home/{user}", "USER": user, "LOGNAME": user}
        cmd = ["runuser", "-u", user, "--", *cmd]
    proc = host.run(cmd, check=False, timeout=timeout, env=env, cwd=str(REPO))
    return parse_run(proc.returncode, proc.stdout + proc.stderr)


def deploy_traces(host: SystemdHost, extra: Mapping[str, Any]) -> dict[str, bool]:
    """Whether each trace of deploy.yml's work is on the host: DEPLOY_PATHS, the service
    account, the lines it adds to files Debian ships, its node_exporter textfile metrics."""
    traces = {path: os.path.lexists(host.path(path)) for path in DEPLOY_PATHS}
    passwd = host.path("/etc/passwd").read_text()
    traces["the qpq account in /etc/passwd"] = re.search(r"(?m)^qpq:", passwd) is not None
    traces["the include of qpq.nft in /etc/nftables.conf"] = \
        "qpq.nft" in host.path("/etc/nftables.conf").read_text()
    listen = str(extra["qpq_prometheus_node_exporter_listen_address"])
    traces["node_exporter's address in /etc/default/prometheus-node-exporter"] = \
        listen in host.path("/etc/default/prometheus-node-exporter").read_text()
    textfiles = host.path("/var/lib/prometheus/node-exporter")
    traces["qpq metrics in /var/lib/prometheus/node-exporter"] = textfiles.is_dir() and any(
        p.name.startswith("qpq") for p in textfiles.iterdir())
    return traces


def use_zipcode_cache(host: SystemdHost) -> None:
    """The private ZIPCODE_CACHE, and sudo keeping its variables for the become step."""
    host.run(["install", "-d", "-m", "0700", "-o", "root", "-g", "root", ZIPCODE_CACHE])
    sudoers = host.path("/etc/sudoers.d/qpq-test-zipcode")
    sudoers.write_text(ZIPCODE_SUDOERS)
    sudoers.chmod(0o440)


@dataclass
class Deployed:
    host: SystemdHost
    vars: dict[str, Any]
    check_fresh: PlaybookRun
    # deploy_traces after the check run, then after the first deploy
    traces_after_check: dict[str, bool]
    traces_after_deploy: dict[str, bool]
    first: PlaybookRun
    second: PlaybookRun

    @property
    def address(self) -> str:
        return str(self.vars["qpq_server_listen"])

    @property
    def metrics_url(self) -> str:
        return "http://" + str(self.vars["qpq_server_metrics_listen"])

    def main_pid(self) -> int:
        return int(self.host.systemctl("show", "-p", "MainPID", "--value", UNIT).stdout)

    def fail_context(self) -> str:
        return self.host.journal(UNIT)


@pytest.fixture(scope="module")
def deployed(host: SystemdHost, qpq_wheel: Path) -> Deployed:
    return deploy_fresh_host(host, qpq_wheel)


def deploy_fresh_host(host: SystemdHost, wheel: Path) -> Deployed:
    """`--check --diff` on the fresh host, then deploy.yml twice: as root, then as a sudo user."""
    inventory = {"all": {"children": {"qpq_servers": {"hosts": {"qpq-test-host": {
        "ansible_connection": "local", "ansible_python_interpreter": "/usr/bin/python3"}}}}}}
    host.path(WORK).mkdir(parents=True, exist_ok=True)
    host.path(f"{WORK}/inventory.yml").write_text(json.dumps(inventory))
    extra = {
        "qpq_server_domain": "chat.example.org",
        "qpq_server_wheel": str(wheel),
        "qpq_server_pip_extra_args": f"--no-index --find-links {wheel.parent}",
        # Loopback ports free on this machine: the host shares its network namespace.
        "qpq_server_listen": f"127.0.0.1:{free_port(socket.SOCK_DGRAM)}",
        "qpq_server_metrics_listen": f"127.0.0.1:{free_port()}",
        "qpq_server_auth_token": AUTH_TOKEN,
        # /proc/sys is read-only in the host (it is this machine's kernel).
        "qpq_sysctl_apply": False,
        "qpq_sysctl_verify": False,
        # Its nftables table is checked (nft -c) but NOT loaded here: the host shares this
        # machine's network namespace. The test loads it into a namespace of its own.
        "qpq_firewall_apply": False,
        "qpq_firewall_monitoring_sources": ["10.9.8.7", "2001:db8::/64"],
        "qpq_prometheus_node_exporter_listen_address": f"127.0.0.1:{free_port()}",
        "qpq_server_acme_hook": ACME_HOOK,
        # The role enables timesyncd; TIMESYNCD_GUARD keeps it off this machine's clock.
        "qpq_server_time_sync": True,
        "qpq_backup_offhost_target": f"{OFFHOST}/",
    }
    guard = host.path("/etc/systemd/system/systemd-timesyncd.service.d/50-test-host.conf")
    guard.parent.mkdir(parents=True, exist_ok=True)
    guard.write_text(TIMESYNCD_GUARD)
    host.systemctl("daemon-reload")
    use_zipcode_cache(host)
    check_fresh = run_playbook(host, "deploy.yml", extra, check=True)
    traces_after_check = deploy_traces(host, extra)
    first = run_playbook(host, "deploy.yml", extra)
    assert first.rc == 0, first.output[-6000:] + host.journal(UNIT)
    traces_after_deploy = deploy_traces(host, extra)
    # The redeploy is an operator's: a sudo user, the DB key now pinned as from a vault, so
    # the preflight must stat and read the 0700 data dir through become.
    add_sudo_user(host)
    db_key = re.search(r"(?m)^QPQ_DB_KEY=(\S+)$", host.path(f"{DATA}/.env").read_text())
    assert db_key
    second = run_playbook(host, "deploy.yml", {**extra, "qpq_server_db_key": db_key.group(1)},
                          user=DEPLOYER)
    return Deployed(host, extra, check_fresh, traces_after_check, traces_after_deploy,
                    first, second)


def add_sudo_user(host: SystemdHost) -> None:
    """DEPLOYER, with passwordless sudo, able to run this checkout's ansible-playbook."""
    host.run(["useradd", "--create-home", "--shell", "/bin/bash", DEPLOYER])
    sudoers = host.path(f"/etc/sudoers.d/{DEPLOYER}")
    sudoers.write_text(f"{DEPLOYER} ALL=(ALL:ALL) NOPASSWD: ALL\n")
    sudoers.chmod(0o440)
    hosts = host.path("/etc/hosts")  # sudo resolves the host's name (minbase has no file)
    known = hosts.read_text() if hosts.exists() else "127.0.0.1 localhost\n"
    hosts.write_text(known + "127.0.1.1 qpq-test-host\n")
    # The venv's interpreter is bound under the host's /root: let the account through (a
    # read-only bind, nothing to write). The wheelhouse is world-readable already.
    host.run(["chmod", "o+x", "/root"])


def test_check_diff_on_a_fresh_host_reports_changes_and_writes_nothing(
        deployed: Deployed) -> None:
    run = deployed.check_fresh
    assert run.rc == 0, run.output[-6000:]
    assert run.changed > 0  # it says what the deploy would do
    written = [trace for trace, found in deployed.traces_after_check.items() if found]
    assert written == [], "--check --diff changed the fresh host"
    # The same probe sees every one of them once the deploy really ran: it can see them.
    missed = [trace for trace, found in deployed.traces_after_deploy.items() if not found]
    assert missed == [], "after the deploy, deploy_traces did not see these"


def test_deploy_then_a_second_run_changes_nothing(deployed: Deployed) -> None:
    assert deployed.first.changed > 0
    # The roll's last step on the host: ready, then doctor (its JSON read, not failing).
    assert "TASK [qpq_server : Run qpq-ops doctor]" in deployed.first.output
    assert deployed.second.rc == 0, deployed.second.output[-6000:]
    assert deployed.second.changed == 0, deployed.second.changed_tasks()


def test_the_hardened_unit_runs_as_the_service_account(deployed: Deployed) -> None:
    host = deployed.host
    # It runs the version `current` points at (one virtualenv per version).
    assert host.run(["readlink", "/opt/qpq/current"]).stdout.strip() == "venvs/0.1.0"
    assert host.systemctl("is-active", UNIT, check=False).stdout.strip() == "active", \
        deployed.fail_context()
    assert host.systemctl("is-enabled", UNIT).stdout.strip() == "enabled"
    user = host.run(["ps", "-o", "user=", "-p", str(deployed.main_pid())]).stdout.strip()
    assert user == "qpq"
    props = dict(line.split("=", 1) for line in host.systemctl(
        "show", UNIT, "-p", "NoNewPrivileges,ProtectSystem,PrivateDevices,"
        "MemoryDenyWriteExecute,ProtectProc,PrivateMounts,RemoveIPC,DevicePolicy").stdout.split())
    assert props == {"NoNewPrivileges": "yes", "ProtectSystem": "strict",
                     "PrivateDevices": "yes", "MemoryDenyWriteExecute": "yes",
                     "ProtectProc": "invisible", "PrivateMounts": "yes", "RemoveIPC": "yes",
                     "DevicePolicy": "closed"}
    ready = httpx.get(deployed.metrics_url + "/readyz", timeout=5)
    assert ready.status_code == 200


def test_the_server_runs_on_uvloop_from_the_fast_extra(deployed: Deployed) -> None:
    maps = deployed.host.run(["cat", f"/proc/{deployed.main_pid()}/maps"]).stdout
    assert "/uvloop/loop." in maps  # qpq_server_fast_extra (default true) installed it


def test_systemd_analyze_security_of_the_unit(deployed: Deployed) -> None:
    out = deployed.host.run(["systemd-analyze", "security", "--no-pager", UNIT],
                            check=False).stdout
    print(out)  # the full table, for the operator reading the test log
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", out)
    assert match, out
    assert float(match.group(1)) <= MAX_EXPOSURE, out


async def _exchange(deployed: Deployed, token: str, profiles: Path, tag: str) -> None:
    ca = deployed.host.path(f"{DATA}/tls/cert.pem")
    async with connect(deployed.address, token, ca=ca, server_name="chat.example.org",
                       timeout=10) as conn:
        client = QpqClient(conn, profiles)
        await client.register(f"alice_{tag}", "correct horse")
        await client.register(f"bob_{tag}", "battery staple")
        await client.send_text(f"alice_{tag}", [f"bob_{tag}"], f"hello over systemd {tag}")
        got = await client.receive(f"bob_{tag}")
        assert [(m.sender, m.text) for m in got] == [(f"alice_{tag}",
                                                      f"hello over systemd {tag}")]


def test_a_client_on_this_machine_exchanges_messages_through_it(deployed: Deployed,
                                                                tmp_path: Path) -> None:
    asyncio.run(_exchange(deployed, AUTH_TOKEN, tmp_path, "first"))


def test_systemctl_reload_rereads_the_token_without_a_restart(deployed: Deployed,
                                                              tmp_path: Path) -> None:
    host = deployed.host
    env = host.path(f"{DATA}/.env")
    before = env.read_text()
    new_token = "reloaded-token-" + "x" * 32
    pid = deployed.main_pid()
    try:
        env.write_text(re.sub(r"(?m)^QPQ_AUTH_TOKEN=.*$", f"QPQ_AUTH_TOKEN={new_token}", before))
        host.systemctl("reload", UNIT)
        asyncio.run(_exchange(deployed, new_token, tmp_path, "reload"))
        assert deployed.main_pid() == pid  # SIGHUP, not a restart
    finally:
        env.write_text(before)
        host.systemctl("reload", UNIT)


def test_a_config_change_restarts_the_server_through_the_handler(deployed: Deployed,
                                                                 tmp_path: Path) -> None:
    pid = deployed.main_pid()
    changed = {**deployed.vars, "qpq_server_log_level": "debug"}
    # The server role, as an operator changing its settings would run it.
    run = run_playbook(deployed.host, "deploy.yml", changed, tags="qpq_server")
    assert run.rc == 0, run.output[-6000:]
    assert "RUNNING HANDLER [qpq_server : Restart qpq-server]" in run.output
    assert deployed.main_pid() not in (0, pid)
    assert 'log_level = "debug"' in deployed.host.path(f"{DATA}/qpq-server.toml").read_text()
    asyncio.run(_exchange(deployed, AUTH_TOKEN, tmp_path, "restarted"))


def test_the_backup_service_runs_once_and_writes_an_archive(deployed: Deployed) -> None:
    host = deployed.host
    assert host.systemctl("is-enabled", "qpq-backup.timer").stdout.strip() == "enabled"
    started = host.systemctl("start", "qpq-backup.service", check=False, timeout=120)
    assert started.returncode == 0, started.stderr + host.journal("qpq-backup.service")
    archives = sorted(host.path("/var/backups/qpq").iterdir())
    assert archives, host.journal("qpq-backup.service")
    listing = host.run(["ls", "-ln", "/var/backups/qpq"]).stdout
    # The unit ran as the server's account: it owns what the backup wrote.
    owners = host.run(["stat", "-c", "%U", *(f"/var/backups/qpq/{a.name}" for a in archives),
                       "/var/lib/qpq-backup/qpq_backup.prom"]).stdout.split()
    assert set(owners) == {"qpq"}, listing
    # Written as the service account into its own dir; node_exporter's dir links to it
    # (an absolute link inside the host: read the target from out here).
    link = host.run(["readlink", "/var/lib/prometheus/node-exporter/qpq_backup.prom"]).stdout
    assert link.strip() == "/var/lib/qpq-backup/qpq_backup.prom"
    metric = host.path("/var/lib/qpq-backup/qpq_backup.prom")
    assert "qpq_backup_last_success_timestamp_seconds" in metric.read_text(), shlex.quote(listing)
    # node_exporter, on the address the role set, serves it to the monitoring host.
    url = f"http://{deployed.vars['qpq_prometheus_node_exporter_listen_address']}/metrics"
    scraped = httpx.get(url, timeout=10).text
    assert "qpq_backup_last_success_timestamp_seconds" in scraped
    assert "node_cpu_seconds_total" in scraped


def test_the_backup_run_copied_the_archives_off_host_with_rsync(deployed: Deployed) -> None:
    """The timer's unit ends with rsync to qpq_backup_offhost_target (a local path here)."""
    host = deployed.host
    archives = sorted(p.name for p in host.path("/var/backups/qpq").glob("qpq-backup-*.tar"))
    copies = sorted(p.name for p in host.path(OFFHOST).glob("qpq-backup-*.tar"))
    assert archives and copies == archives, host.journal("qpq-backup.service")
    for name in copies:
        copy = f"{OFFHOST}/{name}"
        assert host.run(["stat", "-c", "%U %a", copy]).stdout.split() == ["qpq", "600"]
        # The copy, not the original, opened with the server's key and checked.
        verified = host.run(["/opt/qpq/current/bin/qpq-ops", "backup", "verify", copy,
                             "--config", f"{DATA}/qpq-server.toml"], check=False, timeout=120)
        assert verified.returncode == 0, verified.stdout + verified.stderr
    host.run(["cmp", f"/var/backups/qpq/{copies[-1]}", f"{OFFHOST}/{copies[-1]}"])


def test_the_redeploy_ran_as_a_sudo_user_through_become(deployed: Deployed) -> None:
    """The second run (changed=0, above) was DEPLOYER's: sudo logged its become steps."""
    host = deployed.host
    sudo_log = host.run(["journalctl", "--no-pager", "_COMM=sudo"], check=False).stdout
    become = [line for line in sudo_log.splitlines()
              if f"{DEPLOYER} : " in line and "USER=root" in line and "BECOME-SUCCESS" in line]
    assert become, sudo_log[-3000:]
    assert host.path(f"/home/{DEPLOYER}/.ansible").is_dir()
    assert "qpq_server : Read the secrets in use" in deployed.second.output


def test_module_code_ran_with_the_zipcode_cache(deployed: Deployed) -> None:
    """Test speed, not the product: every deploy's module tasks reuse compiled module code."""
    host = deployed.host
    assert any(host.path(ZIPCODE_CACHE).iterdir()), "no module task wrote to ZIPCODE_CACHE"
    # DEPLOYER's become keeps the cache's variables, as root's does.
    env = zipcode_env(ZIPCODE_CACHE)
    echo = " ".join(f'"${name}"' for name in env)
    kept = host.run(["runuser", "-u", DEPLOYER, "--", "sudo", "-n", "-H", "sh", "-c",
                     f"echo {echo}"], env=env).stdout.split()
    assert kept == [str(ZIPCODE_DIR), ZIPCODE_CACHE]


def test_time_sync_runs_but_cannot_set_this_machines_clock(deployed: Deployed) -> None:
    host = deployed.host
    unit = "systemd-timesyncd.service"
    assert host.systemctl("is-enabled", unit).stdout.strip() == "enabled"
    assert host.systemctl("is-active", unit, check=False).stdout.strip() == "active", \
        host.journal(unit)
    pid = host.systemctl("show", "-p", "MainPID", "--value", unit).stdout.strip()
    status = host.run(["grep", "^CapEff", f"/proc/{pid}/status"]).stdout.split()
    assert status == ["CapEff:", "0000000000000000"]  # no CAP_SYS_TIME: the guard holds
    # Whether it reached an NTP server depends on this machine's network: printed only.
    print(host.run(["timedatectl", "timesync-status"], check=False).stdout)
    print(host.journal(unit, lines=15))


def test_the_firewall_table_loads_and_lets_in_only_quic_ssh_and_monitoring(
        deployed: Deployed) -> None:
    host = deployed.host
    assert host.systemctl("is-enabled", "nftables.service").stdout.strip() == "enabled"
    assert 'include "/etc/nftables.d/qpq.nft"' in host.path("/etc/nftables.conf").read_text()
    # Loaded for real, into a fresh network namespace (not this machine's).
    listed = host.run(["unshare", "--net", "sh", "-c",
                       "nft -f /etc/nftables.d/qpq.nft && nft list table inet qpq"]).stdout
    print(listed)
    quic = deployed.address.rsplit(":", 1)[1]
    metrics = str(deployed.vars["qpq_server_metrics_listen"]).rsplit(":", 1)[1]
    lines = [" ".join(line.split()) for line in listed.splitlines()]
    assert "type filter hook input priority filter; policy drop;" in lines
    assert "tcp dport 22 accept" in lines
    assert f"udp dport {quic} accept" in lines
    v4 = next(line for line in lines if line.startswith("ip saddr 10.9.8.7"))
    v6 = next(line for line in lines if line.startswith("ip6 saddr 2001:db8::/64"))
    for line in (v4, v6):
        assert metrics in line and "9100" in line and line.endswith("accept")


async def _ping_with(deployed: Deployed, ca: Path) -> bool:
    async with connect(deployed.address, AUTH_TOKEN, ca=ca, server_name="chat.example.org",
                       timeout=10) as conn:
        return bool((await conn.call("ping"))["ok"])


def test_the_acme_hook_reloads_the_unit_onto_a_renewed_certificate(deployed: Deployed) -> None:
    host = deployed.host
    lineage = "/etc/letsencrypt/live/chat.example.org"
    write_self_signed(host.path(f"{lineage}/fullchain.pem"), host.path(f"{lineage}/privkey.pem"),
                      "chat.example.org")
    pid = deployed.main_pid()
    # As certbot runs it after a renewal: as root, with RENEWED_LINEAGE.
    done = host.run([ACME_HOOK], env={"RENEWED_LINEAGE": lineage}, check=False, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    renewed = host.path(f"{lineage}/fullchain.pem")
    assert host.path(f"{DATA}/tls/cert.pem").read_bytes() == renewed.read_bytes()
    assert host.run(["stat", "-c", "%U", f"{DATA}/tls/cert.pem"]).stdout.strip() == "qpq"

    async def served() -> bool:
        deadline = asyncio.get_running_loop().time() + 20
        while True:  # the SIGHUP reload is asynchronous: until the new pair is served
            try:
                return await _ping_with(deployed, renewed)
            except Exception:
                if asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(0.5)

    assert asyncio.run(served())
    assert deployed.main_pid() == pid  # reloaded, not restarted
