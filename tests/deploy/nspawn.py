"""Booted Debian 12 hosts for the deployment tests: systemd-nspawn containers on a Linux bridge.

What is built once and cached outside the clone, under ``$GPUFLEET_CACHE/nspawn`` (default
``~/.cache/gpufleet/nspawn``), each in a directory named by a key of what went into it, so a
fresh clone on the same machine reuses it (``scripts/build-nspawn-image`` builds them ahead):

- ``image-<key>/rootfs``: ``debootstrap --variant=minbase bookworm`` plus only what a freshly
  provisioned cloud host has that matters to being managed (systemd as init, dbus, sshd,
  python3, python3-apt). No host keys, no machine id, no apt lists: each container gets its own
  identity.
- ``apt-<key>/``: a flat ``file:`` apt repository with the .debs the roles install (and the
  python3-apt Ansible's apt module would install), resolved against the image's dpkg status.
- ``wheels-<key>/``: a pip wheelhouse of gpufleet's dependencies for the hosts' Python.

What each test run makes and always takes down (``Fleet.destroy``, also run for the leftovers
of a run that was killed): a bridge with a private /24, a network namespace per container with
a veth link into the bridge (no NAT, no gateway: only the host and the containers talk), an
overlayfs per container over the read-only image, and one ``systemd-nspawn --boot`` per
container in its own cgroup v2 group. On hybrid-cgroup machines whose PID 1 is not systemd this
needs ``SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1``, ``--keep-unit --register=no`` and a tmpfs on
``/run/systemd/nspawn``; all of it is set up here.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT / "tests") not in sys.path:  # scripts/build-nspawn-image imports this file directly
    sys.path.insert(0, str(ROOT / "tests"))

from helpers import wait_until  # noqa: E402

SUITE = "bookworm"
MIRROR = os.environ.get("GPUFLEET_DEBIAN_MIRROR", "http://deb.debian.org/debian")
SECURITY_MIRROR = os.environ.get("GPUFLEET_DEBIAN_SECURITY_MIRROR", "http://deb.debian.org/debian-security")
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
# A fresh cloud host's share of what being managed needs: systemd as PID 1, dbus, sshd, python3
# for Ansible's modules, and python3-apt (Debian's cloud images have it, for unattended-upgrades;
# with it, Ansible's apt module does not run apt-get update itself first, which would hide a role
# that forgets to). Nothing gpufleet itself needs: the playbook must install that.
IMAGE_PACKAGES = ("systemd", "systemd-sysv", "dbus", "openssh-server", "python3", "python3-apt")
IMAGE_FORMAT = 3  # bump when _build_image's steps change: a new key, a new image
# What Ansible installs on a host that lacks it: its apt module installs python3-apt.
ANSIBLE_TARGET_PACKAGES = ("python3-apt",)

APT_MOUNT = "/srv/gpufleet/apt"
WHEELS_MOUNT = "/srv/gpufleet/wheels"
NSPAWN_RUNTIME = Path("/run/systemd/nspawn")
CGROUP2 = Path(os.environ.get("GPUFLEET_CGROUP2", "/sys/fs/cgroup/unified"))


def log(msg: str) -> None:
    print(f"[nspawn {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    base = os.environ.get("GPUFLEET_CACHE") or str(Path.home() / ".cache" / "gpufleet")
    return Path(base) / "nspawn"


def _sha(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    timeout: float = 120,
    check: bool = True,
    input: str | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing its output; on failure raise with the command and its stderr."""
    res = subprocess.run(
        [str(a) for a in argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input,
        env=env,
        cwd=cwd,
        stdin=None if input is not None else subprocess.DEVNULL,
    )
    if check and res.returncode != 0:
        raise RuntimeError(
            f"{shlex.join(str(a) for a in argv)} exited {res.returncode}\n"
            f"stdout: {res.stdout[-3000:]}\nstderr: {res.stderr[-3000:]}"
        )
    return res


def wait_for(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    """tests/helpers.py's ``wait_until`` (poll a condition until truthy or fail at a deadline) for
    synchronous callers; runs on a thread of its own when called from inside an event loop."""
    coro_fn = lambda: wait_until(cond, timeout=timeout, interval=interval, what=what)  # noqa: E731
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro_fn())
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(coro_fn())).result()


# --- what can run here --------------------------------------------------------------------------


def why_not() -> str | None:
    """None when containers can be booted here, else the reason (the tests skip with it)."""
    if sys.platform != "linux":
        return "needs Linux"
    if os.geteuid() != 0:
        return "booting containers needs root (systemd-nspawn, overlayfs, bridges)"
    for tool, pkg in (
        ("systemd-nspawn", "systemd-container"),
        ("debootstrap", "debootstrap"),
        ("ip", "iproute2"),
        ("ssh", "openssh-client"),
        ("ssh-keygen", "openssh-client"),
        ("dpkg-scanpackages", "dpkg-dev"),
        ("apt-get", "apt"),
    ):
        if shutil.which(tool) is None:
            return f"{tool} not installed (apt-get install {pkg}; scripts/bootstrap does it as root)"
    if not (CGROUP2 / "cgroup.procs").exists() and not (Path("/sys/fs/cgroup") / "cgroup.procs").exists():
        return "no cgroup v2 hierarchy mounted (needed to give each container its own cgroup)"
    if "overlay" not in Path("/proc/filesystems").read_text():
        return "the kernel has no overlayfs"
    return None


def cgroup2_root() -> Path:
    """The cgroup v2 mount: /sys/fs/cgroup on unified hosts, /sys/fs/cgroup/unified on hybrid ones."""
    if (Path("/sys/fs/cgroup") / "cgroup.procs").exists() and not (CGROUP2 / "cgroup.procs").exists():
        return Path("/sys/fs/cgroup")
    return CGROUP2


# --- cached artifacts ---------------------------------------------------------------------------


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve()).rstrip("/") + "/"
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mnt = line.split()[4].replace("\\040", " ")
        if mnt == prefix.rstrip("/") or mnt.startswith(prefix):
            out.append(mnt)
    return out


def remove_tree(path: Path) -> None:
    """rm -rf that first unmounts whatever is mounted below (a failed debootstrap leaves /proc)."""
    if not path.exists():
        return
    for mnt in sorted(_mounts_under(path), key=len, reverse=True):
        run(["umount", "-l", mnt], check=False)
    if _mounts_under(path):
        raise RuntimeError(f"still mounted under {path}: {_mounts_under(path)}")
    shutil.rmtree(path)


def _cached(final: Path, build: Callable[[Path], dict[str, Any]], what: str) -> Path:
    """``final`` once ``build(tmpdir)`` has filled it; built at most once at a time (flock)."""
    marker = final / "built.json"
    if marker.exists():
        return final
    with _lock(final.parent / f".{final.name}.lock"):
        if marker.exists():
            return final
        tmp = final.with_name(final.name + ".partial")
        remove_tree(tmp)
        tmp.mkdir(parents=True)
        log(f"building {what} in {final} (cached for later runs)")
        t0 = time.monotonic()
        info = build(tmp)
        info["seconds"] = round(time.monotonic() - t0, 1)
        info["built_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        (tmp / "built.json").write_text(json.dumps(info, indent=2) + "\n")
        remove_tree(final)
        tmp.rename(final)
        log(f"built {what} in {info['seconds']} s")
    return final


def image_key() -> str:
    return f"{SUITE}-minbase-{_sha([SUITE, MIRROR, IMAGE_PACKAGES, IMAGE_FORMAT, platform.machine()])}"


def _build_image(dest: Path) -> dict[str, Any]:
    rootfs = dest / "rootfs"
    run(
        [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(IMAGE_PACKAGES)}",
            f"--keyring={KEYRING}",
            SUITE,
            rootfs,
            MIRROR,
        ],
        timeout=1800,
    )
    # An image, not a host: identity (host keys, machine id) comes per container.
    for key in (rootfs / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    (rootfs / "etc/machine-id").write_text("")
    # Cloud images set a locale; without the file pam_env logs an error on every ssh login.
    (rootfs / "etc/default/locale").write_text("LANG=C.UTF-8\n")
    with contextlib.suppress(FileNotFoundError):
        (rootfs / "var/lib/dbus/machine-id").unlink()
    # Like a cloud image: no package lists (the etcd role must run apt-get update itself).
    for p in (rootfs / "var/lib/apt/lists").iterdir():
        if p.is_file() and p.name != "lock":
            p.unlink()
    for p in (rootfs / "var/cache/apt").glob("*.bin"):
        p.unlink()
    for p in (rootfs / "var/cache/apt/archives").glob("*.deb"):
        p.unlink()
    return {"suite": SUITE, "mirror": MIRROR, "packages": list(IMAGE_PACKAGES), "format": IMAGE_FORMAT}


def image() -> Path:
    """The cached root file system (read-only to the containers: each runs on an overlay)."""
    return _cached(cache_root() / f"image-{image_key()}", _build_image, "the Debian 12 minbase image") / "rootfs"


def role_packages() -> list[str]:
    """Debian packages the playbook installs on a bare host: the roles' defaults say which."""
    import yaml

    roles = ROOT / "ansible" / "roles"
    common = yaml.safe_load((roles / "gpufleet_common/defaults/main.yml").read_text())
    etcd = yaml.safe_load((roles / "etcd/defaults/main.yml").read_text())
    pkgs = [*common.get("gpufleet_os_packages", []), *etcd["gpufleet_etcd_packages"], *ANSIBLE_TARGET_PACKAGES]
    return sorted(set(pkgs))


def _apt_env(work: Path, status: Path, archives: Path) -> dict[str, str]:
    """apt-get on this machine, isolated from its own sources, preferences and configuration,
    computing what the image lacks (the image's dpkg status) and downloading into ``archives``."""
    empty = work / "empty"
    for d in (empty, work / "lists/partial", work / "cache", archives / "partial"):
        d.mkdir(parents=True, exist_ok=True)
    sources = work / "sources.list"
    sources.write_text(
        f"deb [signed-by={KEYRING}] {MIRROR} {SUITE} main\n"
        f"deb [signed-by={KEYRING}] {MIRROR} {SUITE}-updates main\n"
        f"deb [signed-by={KEYRING}] {SECURITY_MIRROR} {SUITE}-security main\n"
    )
    conf = work / "apt.conf"
    settings = {
        "Dir::Etc::Parts": empty,
        "Dir::Etc::Main": "/dev/null",
        "Dir::Etc::SourceList": sources,
        "Dir::Etc::SourceParts": empty,
        "Dir::Etc::Preferences": "/dev/null",
        "Dir::Etc::PreferencesParts": empty,
        "Dir::State::Lists": work / "lists",
        "Dir::State::status": status,
        "Dir::State::extended_states": work / "extended_states",
        "Dir::Cache": work / "cache",
        "Dir::Cache::archives": archives,
        "Debug::NoLocking": "true",
        "Acquire::Languages": "none",
        "APT::Install-Recommends": "true",  # what the hosts' apt does by default
        "APT::Get::Download-Only": "true",
    }
    conf.write_text("".join(f'{k} "{v}";\n' for k, v in settings.items()))
    return {**os.environ, "APT_CONFIG": str(conf), "DEBIAN_FRONTEND": "noninteractive"}


def apt_key(packages: Sequence[str]) -> str:
    return _sha([image_key(), SUITE, MIRROR, SECURITY_MIRROR, sorted(packages)])


def _build_apt_repo(dest: Path, rootfs: Path, packages: Sequence[str]) -> dict[str, Any]:
    work = dest.parent / f".{dest.name}.work"
    remove_tree(work)
    try:
        env = _apt_env(work, rootfs / "var/lib/dpkg/status", dest)
        run(["apt-get", "update", "-q"], env=env, timeout=600)
        run(["apt-get", "install", "-y", "-q", *packages], env=env, timeout=900)
    finally:
        remove_tree(work)
    (dest / "partial").rmdir()
    with contextlib.suppress(FileNotFoundError):
        (dest / "lock").unlink()
    debs = sorted(p.name for p in dest.glob("*.deb"))
    if not debs:
        raise RuntimeError(f"apt downloaded nothing for {packages}")
    index = run(["dpkg-scanpackages", "--multiversion", "."], cwd=dest, timeout=300)
    (dest / "Packages").write_text(index.stdout)
    return {"packages": list(packages), "debs": debs}


def apt_repo(rootfs: Path | None = None) -> Path:
    """The cached flat apt repository (bind-mounted read-only into the containers)."""
    rootfs = rootfs or image()
    pkgs = role_packages()
    return _cached(
        cache_root() / f"apt-{apt_key(pkgs)}",
        lambda d: _build_apt_repo(d, rootfs, pkgs),
        f"the local apt repository ({', '.join(pkgs)} and dependencies)",
    )


def requirements() -> list[str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def wheels_key() -> str:
    return _sha([requirements(), f"cp{sys.version_info.major}{sys.version_info.minor}", platform.machine()])


def _build_wheelhouse(dest: Path) -> dict[str, Any]:
    # This machine runs the same Debian release, Python minor and architecture as the hosts.
    run(
        [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "-d", dest, *requirements()],
        timeout=900,
    )
    return {"requirements": requirements(), "wheels": sorted(p.name for p in dest.glob("*.whl"))}


def wheelhouse() -> Path:
    """The cached wheelhouse of gpufleet's dependencies (bind-mounted read-only)."""
    return _cached(cache_root() / f"wheels-{wheels_key()}", _build_wheelhouse, "the pip wheelhouse")


def build_wheel(dest: Path, version: str | None = None) -> Path:
    """A wheel of this checkout (``version``: the same code under another version number, e.g.
    for a rolling re-deploy)."""
    src = ROOT
    if version is not None:
        src = dest / f"src-{version}"
        remove_tree(src)
        shutil.copytree(
            ROOT,
            src,
            ignore=shutil.ignore_patterns(
                ".git", ".venv", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache", ".demo", "build", "dist"
            ),
        )
        text = (src / "pyproject.toml").read_text()
        (src / "pyproject.toml").write_text(re.sub(r'(?m)^version = ".*"$', f'version = "{version}"', text, count=1))
    out = dest / ("dist" if version is None else f"dist-{version}")
    remove_tree(out)
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", src, "-w", out], timeout=300)
    (wheel,) = out.glob("gpufleet-*.whl")
    return wheel


@dataclass
class Artifacts:
    image: Path
    apt: Path
    wheels: Path
    seconds: dict[str, float] = field(default_factory=dict)


def artifacts() -> Artifacts:
    """The image, the apt repository and the wheelhouse: built when missing, else reused."""
    seconds: dict[str, float] = {}
    t0 = time.monotonic()
    rootfs = image()
    seconds["image"] = round(time.monotonic() - t0, 1)
    t0 = time.monotonic()
    repo = apt_repo(rootfs)
    seconds["apt repository"] = round(time.monotonic() - t0, 1)
    t0 = time.monotonic()
    wheels = wheelhouse()
    seconds["wheelhouse"] = round(time.monotonic() - t0, 1)
    return Artifacts(rootfs, repo, wheels, seconds)


def prune(keep: set[Path]) -> list[Path]:
    """Delete cached images, repositories and wheelhouses other than ``keep`` (older keys)."""
    gone = []
    for d in sorted(cache_root().glob("*-*")):
        if d.is_dir() and d.name.split("-", 1)[0] in ("image", "apt", "wheels") and d not in keep:
            lock = cache_root() / f".{d.name.removesuffix('.partial')}.lock"
            with _lock(lock):
                remove_tree(d)
            lock.unlink(missing_ok=True)
            gone.append(d)
    return gone


# --- a test run's resources ----------------------------------------------------------------------


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run(["ip", *args], check=check, timeout=30)


def runs_dir() -> Path:
    return cache_root() / "runs"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Container:
    """One booted host: an overlay over the image, a network namespace on the bridge, nspawn."""

    name: str
    address: str
    index: int
    tag: str
    base: Path  # this container's directory in the run's work directory
    prefix_len: int = 24

    @property
    def netns(self) -> str:
        return f"gfd{self.tag}-{self.name}"

    @property
    def veth(self) -> str:
        return f"gfd{self.tag}v{self.index}"

    @property
    def merged(self) -> Path:
        return self.base / "merged"

    @property
    def cgroup(self) -> Path:
        return cgroup2_root() / f"gpufleet-deploy-{self.tag}" / self.name

    @property
    def console_log(self) -> Path:
        return self.base / "console.log"


@dataclass
class Fleet:
    """A run's bridge, containers and ssh identity. ``up()`` boots them; ``destroy()`` takes
    every piece down and is safe to call on a half-built fleet and more than once."""

    workdir: Path
    artifacts: Artifacts
    names: Sequence[str]
    subnet: str = ""  # "10.253.7" → bridge .1, containers .11, .12, ...
    tag: str = ""
    containers: dict[str, Container] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    mounted_runtime: bool = False

    def __post_init__(self) -> None:
        self.tag = self.tag or f"{os.getpid() % 0x10000:04x}"
        self.subnet = self.subnet or os.environ.get("GPUFLEET_DEPLOY_SUBNET", f"10.253.{os.getpid() % 250}")
        self.key = self.workdir / "ssh" / "id_ed25519"
        self.known_hosts = self.workdir / "ssh" / "known_hosts"
        # ssh's control sockets: a Unix socket path holds at most 107 bytes, and ssh adds a
        # 17-byte suffix while it creates one; under pytest's tmp_path (/tmp/pytest-of-root/
        # pytest-472/host-install0/ssh/cm/<40 hex>) that is over the limit once the run counter
        # has three digits, and every ssh then fails as if sshd never answered.
        self.control_dir = Path(tempfile.gettempdir()) / f"gfcm-{self.tag}-{os.getpid()}"
        for i, name in enumerate(self.names):
            self.containers[name] = Container(
                name, f"{self.subnet}.{11 + i}", i, self.tag, self.workdir / "hosts" / name
            )

    @property
    def bridge(self) -> str:
        return f"gfd{self.tag}br"

    @property
    def bridge_address(self) -> str:
        return f"{self.subnet}.1"

    @property
    def state_file(self) -> Path:
        # Per fleet, not per process: a session may hold two (the deployment's three hosts and
        # test_host_install.py's bare one), and one's teardown must not drop the other's record.
        return runs_dir() / f"{os.getpid()}-{self.tag}.json"

    # --- bring up ---------------------------------------------------------------------------

    def up(self, boot_timeout: float = 180) -> None:
        cleanup_stale_runs()
        runs_dir().mkdir(parents=True, exist_ok=True)
        self.state_file.write_text(
            json.dumps({"pid": os.getpid(), "workdir": str(self.workdir), "tag": self.tag, "names": list(self.names)})
        )
        self._ssh_identity()
        self._runtime_dir()
        self._bridge()
        for c in self.containers.values():
            self._overlay(c)
            self._network(c)
        for c in self.containers.values():
            self.start(c)
        for c in self.containers.values():
            self.wait_booted(c, boot_timeout)

    def _ssh_identity(self) -> None:
        (self.workdir / "ssh").mkdir(parents=True, exist_ok=True)
        self.control_dir.mkdir(mode=0o700, exist_ok=True)
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"gpufleet-deploy-{self.tag}", "-f", self.key])
        lines = []
        for c in self.containers.values():
            hk = self.workdir / "ssh" / f"host-{c.name}"
            run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"root@{c.name}", "-f", hk])
            key_type, key = hk.with_suffix(".pub").read_text().split(" ")[:2]
            lines.append(f"{c.address} {key_type} {key}\n")
        self.known_hosts.write_text("".join(lines))

    def _runtime_dir(self) -> None:
        # nspawn keeps per-container propagation directories here and refuses to remove them from
        # a disk file system; /run is not a tmpfs where PID 1 is not systemd.
        NSPAWN_RUNTIME.mkdir(parents=True, exist_ok=True)
        if run(["findmnt", "-n", "-o", "FSTYPE", "--mountpoint", NSPAWN_RUNTIME], check=False).stdout.strip():
            return
        if run(["findmnt", "-n", "-o", "FSTYPE", "--target", NSPAWN_RUNTIME], check=False).stdout.strip() == "tmpfs":
            return
        run(["mount", "-t", "tmpfs", "-o", "mode=0755,size=16m", "gpufleet-nspawn", NSPAWN_RUNTIME])
        self.mounted_runtime = True

    def _bridge(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.bridge_address}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")

    def _overlay(self, c: Container) -> None:
        for d in ("upper", "work", "merged"):
            (c.base / d).mkdir(parents=True, exist_ok=True)
        run(
            [
                "mount",
                "-t",
                "overlay",
                f"gfd{self.tag}-{c.name}",
                "-o",
                f"lowerdir={self.artifacts.image},upperdir={c.base / 'upper'},workdir={c.base / 'work'}",
                c.merged,
            ]
        )
        m = c.merged
        # This host's identity and the site's settings, as cloud-init would write them.
        (m / "etc/machine-id").write_text(hashlib.md5(f"{self.tag}{c.name}{time.time()}".encode()).hexdigest() + "\n")
        (m / "etc/hostname").write_text(c.name + "\n")
        hosts = "".join(f"{o.address} {o.name}\n" for o in self.containers.values())
        (m / "etc/hosts").write_text(f"127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n{hosts}")
        hk = self.workdir / "ssh" / f"host-{c.name}"
        shutil.copyfile(hk, m / "etc/ssh/ssh_host_ed25519_key")
        os.chmod(m / "etc/ssh/ssh_host_ed25519_key", 0o600)
        shutil.copyfile(hk.with_suffix(".pub"), m / "etc/ssh/ssh_host_ed25519_key.pub")
        (m / "etc/ssh/sshd_config.d/gpufleet-test.conf").write_text("HostKey /etc/ssh/ssh_host_ed25519_key\n")
        ssh_dir = m / "root/.ssh"
        ssh_dir.mkdir(mode=0o700, exist_ok=True)
        (ssh_dir / "authorized_keys").write_text(self.key.with_suffix(".pub").read_text())
        os.chmod(ssh_dir / "authorized_keys", 0o600)
        # The site's package mirror: this run's local repository (no internet in here).
        (m / "etc/apt/sources.list").write_text(f"deb [trusted=yes] file:{APT_MOUNT} ./\n")
        # Provisioned just now from an image without package lists: the lists directory is new
        # (cache_valid_time alone would take that for a fresh apt-get update).
        os.utime(m / "var/lib/apt/lists")

    def _network(self, c: Container) -> None:
        _ip("netns", "add", c.netns)
        _ip("link", "add", c.veth, "type", "veth", "peer", "name", "eth0", "netns", c.netns)
        _ip("link", "set", c.veth, "master", self.bridge, "up")
        _ip("-n", c.netns, "addr", "add", f"{c.address}/{c.prefix_len}", "dev", "eth0")
        _ip("-n", c.netns, "link", "set", "eth0", "up")
        _ip("-n", c.netns, "link", "set", "lo", "up")

    def nspawn_argv(self, c: Container) -> list[str]:
        return [
            "systemd-nspawn",
            "--boot",
            "--keep-unit",
            "--register=no",
            f"--machine={c.name}",
            f"--directory={c.merged}",
            f"--network-namespace-path=/run/netns/{c.netns}",
            f"--bind-ro={self.artifacts.apt}:{APT_MOUNT}",
            f"--bind-ro={self.artifacts.wheels}:{WHEELS_MOUNT}",
            "--link-journal=no",
            "--resolv-conf=off",
            "--timezone=off",
            "--console=read-only",
        ]

    def start(self, c: Container) -> None:
        """Launch the container's nspawn in its own cgroup (first boot, or after a reboot)."""
        c.cgroup.mkdir(parents=True, exist_ok=True)
        # The shell moves itself into the container's cgroup, then becomes nspawn.
        argv = ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(c.cgroup), *self.nspawn_argv(c)]
        env = {**os.environ, "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1"}
        with open(c.console_log, "ab") as out:
            out.write(f"\n=== {time.strftime('%H:%M:%S')} {shlex.join(argv)}\n".encode())
            out.flush()
            self.procs[c.name] = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )

    def wait_booted(self, c: Container, timeout: float = 180) -> None:
        """Until sshd answers and systemd has finished starting up (running, or degraded)."""
        proc = self.procs[c.name]

        def sshd_up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"{c.name}: nspawn exited {proc.returncode}:\n{self.console_tail(c)}")
            # A real login: a bare TCP probe makes sshd log an error (kex_exchange_identification).
            return self.ssh(c.name, "true", check=False, timeout=15).returncode == 0

        wait_for(sshd_up, timeout, f"sshd of {c.name}")
        res = self.ssh(c.name, "systemctl is-system-running --wait", check=False, timeout=timeout)
        state = res.stdout.strip()
        if state not in ("running", "degraded"):
            raise AssertionError(f"{c.name}: system state {state!r}\n{res.stderr}\n{self.console_tail(c)}")

    def console_tail(self, c: Container, n: int = 4000) -> str:
        try:
            return c.console_log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    # --- using the hosts --------------------------------------------------------------------

    def ssh_argv(self, name: str) -> list[str]:
        c = self.containers[name]
        return [
            "ssh",
            "-F",
            "/dev/null",
            "-i",
            str(self.key),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            f"UserKnownHostsFile={self.known_hosts}",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=5",
            "-o",
            "ControlMaster=auto",
            "-o",
            f"ControlPath={self.control_dir}/%C",
            "-o",
            "ControlPersist=300",
            "-o",
            "LogLevel=ERROR",
            f"root@{c.address}",
        ]

    def ssh(
        self, name: str, command: str, *, check: bool = True, timeout: float = 60, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a shell command on a host as root, over ssh (the way an operator would)."""
        return run([*self.ssh_argv(name), "--", command], check=check, timeout=timeout, input=input)

    def reboot(self, name: str, timeout: float = 180) -> None:
        """``systemctl reboot`` inside; nspawn exits with 133 (reboot) and is launched again, as
        systemd-nspawn@.service would (RestartForceExitStatus=133)."""
        c = self.containers[name]
        proc = self.procs[name]
        self.ssh(name, "systemctl reboot", check=False, timeout=30)
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{name} did not go down within {timeout}s:\n{self.console_tail(c)}") from None
        if rc != 133:
            raise AssertionError(f"{name}: nspawn exited {rc}, not 133 (reboot):\n{self.console_tail(c)}")
        self._close_master(name)
        self.start(c)
        self.wait_booted(c, timeout)

    def _close_master(self, name: str) -> None:
        run([*self.ssh_argv(name)[:-1], "-O", "exit", f"root@{self.containers[name].address}"], check=False, timeout=10)

    # --- take down --------------------------------------------------------------------------

    def stop(self, name: str, timeout: float = 60) -> None:
        """Power the container off (SIGTERM to nspawn = SIGRTMIN+3 to its systemd), then make sure
        nothing of it is left in its cgroup."""
        c = self.containers[name]
        proc = self.procs.pop(name, None)
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log(f"{name} did not power off within {timeout}s; killing its cgroup")
        kill_cgroup(c.cgroup)
        if proc is not None and proc.poll() is None:
            proc.wait(10)

    def destroy(self) -> None:
        errors: list[str] = []

        def attempt(what: str, fn: Callable[[], object]) -> None:
            try:
                fn()
            except Exception as e:  # keep tearing down the rest
                errors.append(f"{what}: {e}")

        for name in list(self.containers):
            attempt(f"close ssh master {name}", lambda n=name: self._close_master(n))
        # Ansible's own ControlPersist masters (ANSIBLE_SSH_CONTROL_PATH_DIR is in the workdir).
        for sock in (self.workdir / "ansible-cp").glob("*"):
            argv = ["ssh", "-o", f"ControlPath={sock}", "-O", "exit", "x"]
            attempt(f"close {sock}", lambda argv=argv: run(argv, check=False))
        for name in list(self.containers):
            attempt(f"stop {name}", lambda n=name: self.stop(n))
        attempt("remove ssh control sockets", lambda: shutil.rmtree(self.control_dir, ignore_errors=True))
        teardown(self.tag, list(self.containers.values()), self.bridge, errors)
        with contextlib.suppress(FileNotFoundError):
            self.state_file.unlink()
        if self.mounted_runtime:
            attempt("unmount nspawn runtime", lambda: _unmount_runtime_if_unused())
            self.mounted_runtime = False
        if errors:
            raise RuntimeError("teardown incomplete:\n" + "\n".join(errors))


def kill_cgroup(cg: Path, timeout: float = 30) -> None:
    """SIGKILL every process under a cgroup v2 directory and remove it (children first)."""
    if not cg.exists():
        return
    kill = cg / "cgroup.kill"
    if kill.exists():
        kill.write_text("1")
    else:
        for procs in cg.rglob("cgroup.procs"):
            for pid in procs.read_text().split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)

    def empty() -> bool:
        return all(not p.read_text().strip() for p in cg.rglob("cgroup.procs"))

    wait_for(empty, timeout, f"cgroup {cg} empty")
    for d in sorted((p for p in cg.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        d.rmdir()
    cg.rmdir()


def teardown(tag: str, containers: Sequence[Container], bridge: str, errors: list[str]) -> None:
    """Remove a run's kernel state: processes, mounts, namespaces, links, cgroups, overlays."""

    def attempt(what: str, fn: Callable[[], object]) -> None:
        try:
            fn()
        except Exception as e:
            errors.append(f"{what}: {e}")

    for c in containers:
        attempt(f"kill cgroup of {c.name}", lambda c=c: kill_cgroup(c.cgroup))
    parent = cgroup2_root() / f"gpufleet-deploy-{tag}"
    if parent.exists():
        attempt("remove run cgroup", lambda: kill_cgroup(parent))
    for c in containers:
        if _mounts_under(c.merged) or c.merged.is_mount():
            attempt(f"unmount {c.name}", lambda c=c: remove_tree_mounts(c.merged))
        if Path(f"/sys/class/net/{c.veth}").exists():  # takes its peer in the namespace along
            attempt(f"delete link {c.veth}", lambda c=c: _ip("link", "del", c.veth))
        if Path(f"/run/netns/{c.netns}").exists():
            attempt(f"delete netns {c.netns}", lambda c=c: _ip("netns", "del", c.netns))
        if os.environ.get("GPUFLEET_DEPLOY_KEEP") != "1":
            for d in ("upper", "work", "merged"):
                attempt(f"remove {c.base / d}", lambda p=c.base / d: remove_tree(p))
    if Path(f"/sys/class/net/{bridge}").exists():
        attempt(f"delete bridge {bridge}", lambda: _ip("link", "del", bridge))


def remove_tree_mounts(path: Path) -> None:
    for mnt in sorted(_mounts_under(path), key=len, reverse=True):
        run(["umount", mnt], check=False)
    if _mounts_under(path):
        for mnt in sorted(_mounts_under(path), key=len, reverse=True):
            run(["umount", "-l", mnt])


def _unmount_runtime_if_unused() -> None:
    if any(runs_dir().glob("*.json")):
        return  # another run (another pytest) still uses it
    run(["umount", NSPAWN_RUNTIME], check=False)


def cleanup_stale_runs() -> list[str]:
    """Tear down what runs killed before their teardown left behind (their pid is gone)."""
    cleaned = []
    for state in sorted(runs_dir().glob("*.json")) if runs_dir().exists() else []:
        try:
            info = json.loads(state.read_text())
        except (OSError, ValueError):
            state.unlink()
            continue
        if _pid_alive(int(info["pid"])):
            continue
        tag, workdir = info["tag"], Path(info["workdir"])
        containers = [Container(n, "", i, tag, workdir / "hosts" / n) for i, n in enumerate(info["names"])]
        errors: list[str] = []
        teardown(tag, containers, f"gfd{tag}br", errors)
        if errors:
            log(f"stale run {info['pid']}: " + "; ".join(errors))
        state.unlink()
        cleaned.append(f"run {info['pid']} ({workdir})")
    return cleaned
