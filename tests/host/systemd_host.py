"""A throwaway Debian 12 host with systemd as PID 1, for tests that need a real service manager.

The root file system comes from `debootstrap` once and is cached as a tarball keyed by what
went into it; each host unpacks a fresh copy. systemd runs as PID 1 of new PID, mount, UTS
and cgroup namespaces (`unshare` + `chroot`), NOT a new network namespace: the host side
reaches the guest's services over the shared loopback, as a client on the same machine
would. `nsenter` runs commands inside. `systemd-nspawn -b` does not work on the CI machines;
this does (root is required).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
# What a fresh qpq host has before deploy.yml runs, plus what deploy.yml would install
# (node_exporter, systemd-timesyncd, rsync for the off-host backup copy): its apt tasks then
# find them installed, so a test run does not go online for them.
PACKAGES = (
    "ca-certificates", "dbus", "iproute2", "nftables", "procps", "prometheus-node-exporter",
    "python3", "python3-apt", "python3-venv", "rsync", "sudo", "systemd", "systemd-sysv",
    "systemd-timesyncd",
)
# Bump when the way the root is prepared changes, so old tarballs are not reused.
_LAYOUT = 1
CACHE_DIR = Path(os.environ.get("QPQ_TEST_HOST_CACHE", "/var/cache/qpq-test-host"))


class HostError(RuntimeError):
    """The test host could not be built, booted or driven."""


def cache_key() -> str:
    spec = {"suite": SUITE, "mirror": MIRROR, "packages": sorted(PACKAGES), "layout": _LAYOUT}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def rootfs_tarball(cache_dir: Path = CACHE_DIR, timeout: float = 900.0) -> Path:
    """The cached root tarball, built with debootstrap the first time (a few minutes)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    tarball = cache_dir / f"{SUITE}-{cache_key()}.tar"
    with (cache_dir / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder; the others wait and reuse it
        if tarball.exists():
            return tarball
        if shutil.which("debootstrap") is None:
            raise HostError("debootstrap is missing: run `make sysdeps` (Debian package debootstrap)")
        build = Path(tempfile.mkdtemp(prefix=".build-", dir=cache_dir))
        try:
            proc = subprocess.run(
                ["debootstrap", "--variant=minbase", "--include=" + ",".join(PACKAGES),
                 SUITE, str(build), MIRROR],
                capture_output=True, text=True, timeout=timeout, check=False)
            if proc.returncode != 0:
                raise HostError(f"debootstrap failed ({proc.returncode}):\n{proc.stdout[-3000:]}"
                                f"{proc.stderr[-2000:]}")
            for deb in (build / "var/cache/apt/archives").glob("*.deb"):
                deb.unlink()
            partial = tarball.with_suffix(".tar.partial")
            subprocess.run(["tar", "-C", str(build), "--numeric-owner", "-cf", str(partial), "."],
                           check=True, capture_output=True, timeout=300)
            partial.rename(tarball)
        finally:
            shutil.rmtree(build, ignore_errors=True)
    return tarball


def _cgroup2_base() -> Path:
    """Where this machine mounts the cgroup v2 hierarchy (pure v2, or hybrid's unified/)."""
    for base in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
        if (base / "cgroup.procs").exists():
            return base
    raise HostError("no cgroup v2 hierarchy under /sys/fs/cgroup: systemd cannot run as PID 1")


# Runs in the new namespaces, then becomes systemd. $1 is the root, $2.. are read-only binds
# (same path inside as outside). /run is a fresh tmpfs, like a boot.
_STAGE2 = r"""
set -eu
root=$1; shift
mount --bind "$root" "$root"
mount -t proc proc "$root/proc"
# Read-only like a container runtime's: the guest shares this machine's network namespace,
# so its sysctls would be this machine's.
mount --bind "$root/proc/sys" "$root/proc/sys"
mount -o remount,bind,ro "$root/proc/sys"
mount -t sysfs sysfs "$root/sys"
mount -t cgroup2 cgroup2 "$root/sys/fs/cgroup"
mount -t tmpfs -o mode=755 tmpfs "$root/dev"
for d in null zero full random urandom tty; do
  touch "$root/dev/$d"; mount --bind "/dev/$d" "$root/dev/$d"
done
mkdir -p "$root/dev/pts" "$root/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666 devpts "$root/dev/pts"
ln -s pts/ptmx "$root/dev/ptmx"
mount -t tmpfs tmpfs "$root/dev/shm"
ln -s /proc/self/fd "$root/dev/fd"
mount -t tmpfs -o mode=755 tmpfs "$root/run"
for src in "$@"; do
  mkdir -p "$root$src"
  mount --bind "$src" "$root$src"
  mount -o remount,bind,ro "$root$src"
done
export container=qpq-test-host
exec chroot "$root" /lib/systemd/systemd --system
"""

# Runs in a cgroup of its own ($1), so the guest's systemd manages only that subtree.
_STAGE1 = r"""
set -eu
echo $$ > "$1/cgroup.procs"
shift
exec unshare --pid --fork --mount --uts --cgroup --propagation private /bin/sh -c "$0" stage2 "$@"
"""


class SystemdHost:
    """A booted guest: `run` executes inside it, `path` maps a guest path to this machine."""

    def __init__(self, root: Path, log: Path) -> None:
        self.root = root
        self.log = log
        self.cgroup = _cgroup2_base() / f"qpq-test-host-{uuid.uuid4().hex[:12]}"
        self._unshare: subprocess.Popen[bytes] | None = None
        self.pid = 0  # systemd, as seen from this machine

    def path(self, guest_path: str) -> Path:
        return self.root / guest_path.lstrip("/")

    def boot(self, binds: Sequence[Path] = (), timeout: float = 60.0) -> None:
        self.cgroup.mkdir()
        (self.root / "etc/hostname").write_text("qpq-test-host\n")
        (self.root / "etc/machine-id").write_text("")  # systemd makes a transient one
        shutil.copy2("/etc/resolv.conf", self.root / "etc/resolv.conf")
        with self.log.open("ab") as out:
            self._unshare = subprocess.Popen(
                ["/bin/sh", "-c", _STAGE1, _STAGE2, str(self.cgroup), str(self.root),
                 *(str(b) for b in binds)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            if self._unshare.poll() is not None:
                raise HostError(f"the host exited while booting ({self._unshare.returncode}):\n"
                                f"{self.log.read_text(errors='replace')[-3000:]}")
            self.pid = self.pid or self._find_systemd()
            if self.pid:
                proc = self.run(["systemctl", "is-system-running"], check=False, timeout=10)
                state = proc.stdout.strip()
                if state in ("running", "degraded"):
                    return
            time.sleep(0.3)
        raise HostError(f"systemd did not finish booting in {timeout}s (state {state!r})")

    def _find_systemd(self) -> int:
        procs = (self.cgroup / "cgroup.procs").read_text().split()
        for child in self.cgroup.rglob("cgroup.procs"):
            procs += child.read_text().split()
        for pid in procs:
            try:
                if Path(f"/proc/{pid}/root").resolve() == self.root.resolve() and \
                        Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                    return int(pid)
            except OSError:
                continue
        return 0

    def run(self, argv: Sequence[str], *, check: bool = True, timeout: float = 60.0,
            env: Mapping[str, str] | None = None,
            cwd: str = "/") -> subprocess.CompletedProcess[str]:
        """`argv` inside the guest, as root, in its namespaces and root directory."""
        if not self.pid:
            raise HostError("the host is not booted")
        base = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "HOME": "/root", "LANG": "C.UTF-8"}
        cmd = ["nsenter", "-t", str(self.pid), "-m", "-u", "-p", "-C", "-r", "-w", "--",
               "env", "-i", "-C", cwd, *(f"{k}={v}" for k, v in {**base, **(env or {})}.items()), *argv]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise HostError(f"in the host: {shlex.join(argv)} exited {proc.returncode}:\n"
                            f"{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
        return proc

    def systemctl(self, *args: str, check: bool = True,
                  timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return self.run(["systemctl", "--no-pager", *args], check=check, timeout=timeout)

    def journal(self, unit: str, lines: int = 60) -> str:
        proc = self.run(["journalctl", "--no-pager", "-n", str(lines), "-u", unit], check=False)
        return proc.stdout + proc.stderr

    def shutdown(self, timeout: float = 30.0) -> None:
        """Power off; whatever is still running after `timeout` is killed."""
        if self.pid:
            with suppress(subprocess.TimeoutExpired):
                self.run(["systemctl", "poweroff", "--no-block"], check=False, timeout=10)
        if self._unshare is not None:
            try:
                self._unshare.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                if self.pid:
                    # PID 1 of its namespace: the kernel kills the rest with it.
                    os.kill(self.pid, signal.SIGKILL)
                self._unshare.wait(timeout=10)
        self._remove_cgroup()
        self.pid = 0

    def _remove_cgroup(self) -> None:
        if not self.cgroup.exists():
            return
        kill = self.cgroup / "cgroup.kill"
        if kill.exists():
            kill.write_text("1")
        deadline = time.monotonic() + 10
        # Deepest first: a cgroup can only be removed once its children are.
        children = [p for p in self.cgroup.rglob("*") if p.is_dir()]
        for child in sorted(children, key=lambda p: len(p.parts), reverse=True):
            self._rmdir(child, deadline)
        self._rmdir(self.cgroup, deadline)

    @staticmethod
    def _rmdir(path: Path, deadline: float) -> None:
        while True:
            try:
                path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


@contextmanager
def systemd_host(binds: Sequence[Path] = ()) -> Iterator[SystemdHost]:
    """A freshly unpacked, booted host that is always powered off and deleted afterwards.

    It lives in a directory of its own under /var/tmp, not pytest's tmp_path: other pytest
    runs on the machine prune old /tmp/pytest-of-USER dirs, which would pull the root file
    system from under a running host.
    """
    if os.geteuid() != 0:
        raise HostError("the systemd test host needs root (namespaces, mounts, chroot)")
    tarball = rootfs_tarball()
    workdir = Path(tempfile.mkdtemp(prefix="qpq-test-host-", dir="/var/tmp"))
    root = workdir / "root"
    root.mkdir()
    subprocess.run(["tar", "-C", str(root), "--numeric-owner", "-xpf", str(tarball)],
                   check=True, capture_output=True, timeout=300)
    root.chmod(0o755)  # "/" of the guest: every service account walks through it
    # The package lists in the root are the ones its packages came from: treat them as
    # fresh so apt's cache_valid_time does not send every test run online.
    stamp = root / "var/lib/apt/periodic/update-success-stamp"
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.touch()
    host = SystemdHost(root, workdir / "boot.log")
    try:
        host.boot(binds)
        yield host
    finally:
        host.shutdown()
        # Binds lived in the guest's private mount namespace, gone with it: this only
        # ever deletes the unpacked root itself.
        shutil.rmtree(workdir, ignore_errors=True)
