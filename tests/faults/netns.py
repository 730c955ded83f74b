"""Network namespaces and veth pairs: a second "host" on this machine that can be cut off.

``Host`` is a namespace with any number of veth links to the root namespace, each a /30 with
the root end at ``.1`` and the host end at ``.2``. ``cut(link)`` takes the host end down: the
host loses that link's route, and packets from the root side go out a link with no carrier and
are dropped without a reset, as in a real partition; ``heal(link)`` brings it back. Processes
run inside with ``host.prefix`` (``ip netns exec NAME``, which execs, so the PID is the
process's own).

Needs root and iproute2; ``requires_netns`` skips with the reason otherwise. Names carry the
test process's PID, and ``destroy()`` (also run for leftovers of a crashed earlier run with the
same PID) removes the namespace and, with it, the links.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
from dataclasses import dataclass

import pytest


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2's ip(8) is not installed"
    probe = f"gfprobe{os.getpid() % 100000}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"cannot create a network namespace here: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


_REASON = _why_not()
requires_netns = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")

_subnets = itertools.count((os.getpid() * 7) % 4000)


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")


@dataclass(frozen=True)
class Link:
    root_if: str
    host_if: str
    root_ip: str
    host_ip: str


class Host:
    def __init__(self, label: str) -> None:
        self.name = f"gf{os.getpid()}{label}"[:15]
        self.prefix = ["ip", "netns", "exec", self.name]
        self.links: list[Link] = []
        self.destroy()
        _ip("netns", "add", self.name)
        _ip("-n", self.name, "link", "set", "lo", "up")

    def link(self) -> Link:
        """A new veth pair from the root namespace into this host, with a fresh /30."""
        n = next(_subnets)
        base = f"10.{200 + n // 4000 % 50}.{n // 16 % 250}.{(n % 16) * 4}"
        a, b, c, d = base.split(".")
        root_ip, host_ip = f"{a}.{b}.{c}.{int(d) + 1}", f"{a}.{b}.{c}.{int(d) + 2}"
        i = len(self.links)
        root_if, host_if = f"{self.name[:11]}r{i}", f"{self.name[:11]}h{i}"
        _ip("link", "add", root_if, "type", "veth", "peer", "name", host_if)
        _ip("link", "set", host_if, "netns", self.name)
        _ip("addr", "add", f"{root_ip}/30", "dev", root_if)
        _ip("link", "set", root_if, "up")
        _ip("-n", self.name, "addr", "add", f"{host_ip}/30", "dev", host_if)
        _ip("-n", self.name, "link", "set", host_if, "up")
        link = Link(root_if, host_if, root_ip, host_ip)
        self.links.append(link)
        return link

    def cut(self, link: Link) -> None:
        _ip("-n", self.name, "link", "set", link.host_if, "down")

    def heal(self, link: Link) -> None:
        _ip("-n", self.name, "link", "set", link.host_if, "up")
        _ip("-n", self.name, "addr", "replace", f"{link.host_ip}/30", "dev", link.host_if)

    def destroy(self) -> None:
        # Deleting the namespace deletes the host ends, and a veth pair dies with either end.
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
        for link in self.links:
            subprocess.run(["ip", "link", "del", link.root_if], capture_output=True)
