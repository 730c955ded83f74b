"""The etcd keyspace: the only place that spells ``/gpufleet/<cluster>/…`` paths.

    /gpufleet/<cluster>/nodes/<node>          NodeRecord          (agent, under its lease)
    /gpufleet/<cluster>/leader                LeaderRecord        (coordinator, under its lease)
    /gpufleet/<cluster>/epoch                 the last epoch      (written with /leader; no lease)
    /gpufleet/<cluster>/routes/<model>        RouteRecord         (leader, epoch-guarded: the model's header)
    /gpufleet/<cluster>/routeslices/<model>/@<n>  RouteSlice      (leader, epoch-guarded: ≤ 100 endpoints)
    /gpufleet/<cluster>/models/<model>        ModelRecord         (operator via gpuctl)
    /gpufleet/<cluster>/assignments/<node>    AssignmentRecord    (leader, epoch-guarded)
    /gpufleet/<cluster>/drain/<node>          DrainRecord         (operator via gpuctl)
    /gpufleet/<cluster>/state/degradation     DegradationRecord   (leader, epoch-guarded)
    /gpufleet/<cluster>/state/placement       PlacementRecord     (leader, epoch-guarded)
    /gpufleet/<cluster>/state/keyshares       KeySharesRecord     (leader, epoch-guarded)
    /gpufleet/<cluster>/keys/<name>           ApiKeyRecord        (operator via gpuctl keys; never deleted)
    /gpufleet/<cluster>/usage/<node>          UsageRecord         (that node's agent; no lease: kept after it left)
    /gpufleet/<cluster>/config                ClusterPolicy       (first leader; then gpuctl config)
    /gpufleet/<cluster>/history/config/<rev>  an earlier ClusterPolicy, by its mod revision (gpuctl config)

Names that become path segments are validated: a node or model name can never climb out of
its folder or collide with another kind of key.
"""

from __future__ import annotations

import hashlib
import re

ROOT = "/gpufleet"
# Model names are OpenAI model ids ("qwen2.5-7b", "Qwen/Qwen3-32B", "qwen3:32b"): allow those,
# but no "..", no leading or doubled "/", nothing that is not printable ASCII.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@+-]{0,127}$")
_MODEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@+-]{0,127}(/[A-Za-z0-9][A-Za-z0-9_.:@+-]{0,127})?$")


class InvalidName(ValueError):
    pass


def check_name(kind: str, name: str, pattern: re.Pattern[str] = _NAME) -> str:
    if not pattern.match(name) or ".." in name:
        raise InvalidName(f"invalid {kind} name {name!r}: use letters, digits and . _ : @ + - (max 128)")
    return name


def check_model(model: str) -> str:
    return check_name("model", model, _MODEL)


_NOT_IN_INSTANCE_NAME = re.compile(r"[^A-Za-z0-9_.-]+")


def assigned_instance_name(model: str) -> str:
    """The instance name an assigned replica of ``model`` gets on a node.

    Instance names become file and cgroup names, so the model id is reduced to safe characters;
    the hash keeps "a/b" and "a:b" apart, and the "m-" prefix keeps clear of names operators
    give static instances in their config."""
    slug = _NOT_IN_INSTANCE_NAME.sub("-", model).strip("-._")[:40] or "model"
    return f"m-{slug}-{hashlib.sha256(model.encode()).hexdigest()[:6]}"


class Keyspace:
    def __init__(self, cluster: str, root: str = ROOT) -> None:
        self.cluster = check_name("cluster", cluster)
        self.prefix = f"{root}/{cluster}/"

    # prefixes (for listing and watching)
    @property
    def nodes(self) -> str:
        return self.prefix + "nodes/"

    @property
    def routes(self) -> str:
        return self.prefix + "routes/"

    @property
    def route_slices(self) -> str:
        return self.prefix + "routeslices/"

    def model_slices(self, model: str) -> str:
        """The prefix of one model's slices. A model-name segment never starts with "@", so the
        prefix of "qwen" never matches a slice of "qwen/x" (nor "qwen-2" one of "qwen")."""
        return self.route_slices + check_name("model", model, _MODEL) + "/@"

    def route_slice(self, model: str, n: int) -> str:
        return f"{self.model_slices(model)}{n:04d}"

    def slice_range(self, model: str, first: int, last: int) -> tuple[str, str]:
        """[start, end) of the keys of ``model``'s slices ``first`` to ``last`` (one range
        watch for an agent's subset of them: the numbers are zero-padded, so key order is
        number order)."""
        return self.route_slice(model, first), self.route_slice(model, last) + "\x00"

    def slice_of(self, key: str) -> tuple[str, int] | None:
        """(model, slice number) of a key under ``route_slices``; None if it is not one."""
        rest = key[len(self.route_slices) :] if key.startswith(self.route_slices) else ""
        model, sep, n = rest.rpartition("/@")
        if not sep or not n.isdigit() or not _MODEL.match(model):
            return None
        return model, int(n)

    @property
    def models(self) -> str:
        return self.prefix + "models/"

    @property
    def assignments(self) -> str:
        return self.prefix + "assignments/"

    @property
    def drains(self) -> str:
        return self.prefix + "drain/"

    @property
    def api_keys(self) -> str:
        return self.prefix + "keys/"

    @property
    def usage(self) -> str:
        return self.prefix + "usage/"

    # single keys
    def node(self, node: str) -> str:
        return self.nodes + check_name("node", node)

    @property
    def leader(self) -> str:
        return self.prefix + "leader"

    @property
    def epoch(self) -> str:
        return self.prefix + "epoch"

    def route(self, model: str) -> str:
        return self.routes + check_name("model", model, _MODEL)

    def model(self, model: str) -> str:
        return self.models + check_name("model", model, _MODEL)

    def assignment(self, node: str) -> str:
        return self.assignments + check_name("node", node)

    def drain(self, node: str) -> str:
        return self.drains + check_name("node", node)

    def api_key(self, name: str) -> str:
        return self.api_keys + check_name("key", name)

    def node_usage(self, node: str) -> str:
        return self.usage + check_name("node", node)

    @property
    def degradation(self) -> str:
        return self.prefix + "state/degradation"

    @property
    def placement(self) -> str:
        return self.prefix + "state/placement"

    @property
    def keyshares(self) -> str:
        return self.prefix + "state/keyshares"

    @property
    def config(self) -> str:
        """The cluster's policy (gpufleet/policyconfig.py): one key, never a prefix."""
        return self.prefix + "config"

    @property
    def config_history(self) -> str:
        return self.prefix + "history/config/"

    def config_version(self, mod_revision: int) -> str:
        """Where the version of ``/config`` written at ``mod_revision`` is kept once replaced
        (zero-padded: keys sort in revision order)."""
        return f"{self.config_history}{mod_revision:020d}"

    @staticmethod
    def name_in(prefix: str, key: str) -> str:
        """The last path part of ``key`` under ``prefix`` (e.g. the node of a node key)."""
        if not key.startswith(prefix):
            raise ValueError(f"{key!r} is not under {prefix!r}")
        return key[len(prefix) :]
