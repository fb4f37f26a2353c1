"""The Grafana apt key is pinned by fingerprint: qpq_grafana's apt_key.yml for real, with
keys made here by gpg and served as file:// URLs (the role's get_url reads them)."""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.ansible.runner import PlaybookRun, run_playbook

pytestmark = pytest.mark.timeout(300)

KEYRING = "etc/apt/keyrings/grafana.asc"


def _gpg(home: Path, *args: str) -> str:
    return subprocess.run(["gpg", "--batch", "--homedir", str(home), *args], check=True,
                          capture_output=True, text=True, timeout=60).stdout


def _new_key(home: Path, uid: str) -> str:
    """A fresh signing key in `home`; returns its fingerprint."""
    _gpg(home, "--passphrase", "", "--quick-gen-key", uid, "ed25519", "sign", "never")
    listing = _gpg(home, "--with-colons", "--list-keys", uid)
    return re.findall(r"^fpr:+([0-9A-F]{40}):", listing, re.M)[0]


GPG_DAEMONS = ("gpg-agent", "keyboxd", "dirmngr")
ROLE_HOME_SUFFIX = ".qpq-grafana-key"  # the role's throwaway home (tasks/apt_key.yml)


def _daemons(marker: str) -> list[str]:
    """gpg daemons whose command line names `marker` (their --homedir)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue  # the process ended meanwhile
        if Path(argv[0].decode(errors="replace")).name in GPG_DAEMONS and any(
                marker.encode() in arg for arg in argv):
            found.append(b" ".join(argv).decode(errors="replace"))
    return found


def _assert_no_daemon_survives(marker: str, deadline_s: float = 10.0) -> None:
    deadline = time.monotonic() + deadline_s
    while (left := _daemons(marker)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left, f"gpg daemons left running: {left}"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    base = tmp_path_factory.mktemp("gpg")
    home = base / "home"
    home.mkdir(mode=0o700)
    try:
        pinned = _new_key(home, "Pinned Repo <repo@example.org>")
        other = _new_key(home, "Someone Else <other@example.org>")
        both = base / "both.asc"
        both.write_text(_gpg(home, "--armor", "--export", pinned, other))
        only_other = base / "other.asc"
        only_other.write_text(_gpg(home, "--armor", "--export", other))
        yield {"pinned": pinned, "other": other, "both": both, "only_other": only_other}
    finally:
        # Making keys started a gpg-agent for this home; it would outlive the test.
        subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], check=False,
                       capture_output=True, timeout=60)
    _assert_no_daemon_survives(str(home))
    _assert_no_daemon_survives(ROLE_HOME_SUFFIX)


def _run(tmp_path: Path, url_file: object, fingerprint: object) -> PlaybookRun:
    playbook = tmp_path / "apt-key.yml"
    playbook.write_text(
        "- name: Pin the Grafana apt key\n"
        "  hosts: localhost\n"
        "  gather_facts: false\n"
        "  tasks:\n"
        "    - name: Fetch, check and write the key\n"
        "      ansible.builtin.include_role:\n"
        "        name: qpq_grafana\n"
        "        tasks_from: apt_key\n")
    return run_playbook(str(playbook), tmp_path / "work", {
        "qpq_root": str(tmp_path / "root"), "ansible_become": False,
        "qpq_grafana_apt_key_url": f"file://{url_file}",
        "qpq_grafana_apt_key_fingerprint": fingerprint})


def _fingerprints(path: Path) -> list[str]:
    shown = subprocess.run(["gpg", "--batch", "--with-colons", "--show-keys", str(path)],
                           check=True, capture_output=True, text=True, timeout=60).stdout
    # Primary keys only (the fpr line right after each pub line).
    return re.findall(r"^pub:.*\nfpr:+([0-9A-F]{40}):", shown, re.M)


def test_only_the_pinned_key_lands_in_apt_keyring(tmp_path: Path,
                                                  keys: dict[str, object]) -> None:
    run = _run(tmp_path, keys["both"], keys["pinned"])
    assert run.rc == 0, run.output[-3000:]
    keyring = tmp_path / "root" / KEYRING
    assert _fingerprints(keyring) == [keys["pinned"]]  # the other key is not trusted
    again = _run(tmp_path, keys["both"], keys["pinned"])
    assert again.rc == 0 and again.changed == 0, again.changed_tasks()


def test_a_download_without_the_pinned_key_fails_and_trusts_nothing(
        tmp_path: Path, keys: dict[str, object]) -> None:
    run = _run(tmp_path, keys["only_other"], keys["pinned"])
    assert run.rc != 0
    assert f"gave no key with fingerprint {keys['pinned']}" in " ".join(run.output.split())
    assert not (tmp_path / "root" / KEYRING).exists()
