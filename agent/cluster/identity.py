"""Who holds a node's registration: this agent (restarted or not), or another one.

Two agents configured with the same ``node_id`` (a cloned image, a copy-pasted config) used to
take the node record from each other on every keep-alive, forever. Each agent now writes an
*agent identity* into its record, and registers only over a record that is absent, carries no
live lease, or carries its own identity.

The identity is ``<id>@<boot>``: ``<id>`` a random id kept in the agent's state directory
(``agent-id``, created on first start), ``<boot>`` the kernel's boot id. So:

- the same agent restarted (``systemctl restart``, a crash, the handover restart that leaves its
  lease for the next process) has the same identity and takes its own record over at once;
- a second host, even one cloned with the state directory, has another boot id; a second agent
  on the same host has another state directory: either is refused while the record is held;
- a host rebooted faster than its lease TTL is refused until that lease expires (≤ one TTL).

Records written by agents from before the identity existed carry none: those are ours when
they advertise our address (the rolling upgrade's handover), another agent's otherwise.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import msgspec
import structlog

from gpufleet.etcd import KeyValue

log = structlog.get_logger("agent.cluster")

ID_FILE = "agent-id"
_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def agent_identity(state_dir: str | None) -> str:
    """This agent's identity (see the module docstring); never raises."""
    return f"{_stored_id(state_dir)}@{_boot_id()}"


def _boot_id() -> str:
    try:
        return _BOOT_ID.read_text().strip()[:8] or "noboot"
    except OSError:
        return "noboot"


def _stored_id(state_dir: str | None) -> str:
    if state_dir:
        path = Path(state_dir) / ID_FILE
        try:
            text = path.read_text().strip()
            if text:
                return text
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("cannot read the agent id; using one for this process only", path=str(path), error=str(e))
            return uuid.uuid4().hex[:16]
        new = uuid.uuid4().hex[:16]
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{ID_FILE}.{os.getpid()}")
            tmp.write_text(new + "\n")
            os.replace(tmp, path)  # two agents racing on one state dir agree on the winner's id
            return path.read_text().strip() or new
        except OSError as e:
            log.warning("cannot store the agent id; using one for this process only", path=str(path), error=str(e))
    # A restart then counts as another agent: it waits up to one lease TTL for its own old lease.
    return uuid.uuid4().hex[:16]


class _Holder(msgspec.Struct, kw_only=True):
    """The fields of a node record that say who wrote it (any other field is ignored)."""

    node: str = ""
    address: str = ""
    agent_id: str = ""


@dataclass(frozen=True)
class OtherHolder:
    """Another agent holds the node's registration under a live lease."""

    node: str
    address: str
    agent_id: str
    lease: int

    def describe(self) -> str:
        who = f"the agent at {self.address}" if self.address else "an agent whose record cannot be read"
        ident = f" (agent id {self.agent_id})" if self.agent_id else ""
        return f"node_id {self.node!r} is registered by {who}{ident}, lease {self.lease:x}"


def other_holder(prev: KeyValue | None, node: str, identity: str, address: str) -> OtherHolder | None:
    """Who holds ``prev`` (the node key as read), if it is not ours to take: None when the key is
    absent, has no lease (nothing keeps it alive), or was written by this agent."""
    if prev is None or not prev.lease:
        return None
    try:
        h = msgspec.json.decode(prev.value, type=_Holder)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return OtherHolder(node, "", "", prev.lease)  # unreadable, yet kept alive by someone
    if h.agent_id == identity or (not h.agent_id and h.address == address):
        return None
    return OtherHolder(h.node or node, h.address, h.agent_id, prev.lease)
