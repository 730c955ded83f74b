"""Port plan: explicit ports as configured, the rest allocated from a base without conflicts.

Ports are planned once and kept across restarts and reloads, so a client (or a route in etcd)
that knows an instance's port keeps being right. A port another process holds is an error for
an explicit port and skipped for an allocated one.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable, Iterable


class PortPlanError(Exception):
    pass


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when we could bind it now. SO_REUSEADDR so our own just-exited server's TIME_WAIT
    sockets do not count as taken (the server itself binds the same way)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def plan_ports(
    wanted: Iterable[tuple[str, int | None]],
    base: int,
    span: int,
    reserved: Iterable[int] = (),
    keep: dict[str, int] | None = None,
    is_free: Callable[[int], bool] = port_is_free,
) -> dict[str, int]:
    """Assign a port to each ``(name, explicit_port)``.

    ``keep`` holds ports already assigned to running instances (reload); they are reused for
    instances that still ask for no explicit port. ``reserved`` ports are never allocated.
    """
    wanted = list(wanted)
    keep = keep or {}
    taken = set(reserved)
    plan: dict[str, int] = {}
    for name, explicit in wanted:
        if explicit is not None:
            plan[name] = explicit
            taken.add(explicit)
    for name, explicit in wanted:
        if explicit is None and name in keep and keep[name] not in taken:
            plan[name] = keep[name]
            taken.add(keep[name])
    candidate = base
    for name, _ in wanted:
        if name in plan:
            continue
        while candidate < base + span and (candidate in taken or not is_free(candidate)):
            candidate += 1
        if candidate >= base + span:
            raise PortPlanError(f"no free port left in {base}..{base + span - 1} for instance {name!r}")
        plan[name] = candidate
        taken.add(candidate)
        candidate += 1
    return plan
