"""Model placement: which node and GPU runs each replica of each registered model.

The leader runs ``place`` every tick on (registered models, its view of the nodes, the current
assignments) and writes the assignment records that changed. The rules, in the order applied:

1. One replica per (model, node): replicas are spread so that losing a node costs one replica.
   A replica uses ``gpus_per_replica`` GPUs (tensor parallel), all of one class, on one node.
2. A node is eligible for model M when it has a record, is not DOWN, not drained, has a GPU
   that is not lost and whose class M allows (no classes = any), M's path is not known to be
   unusable there (availability ``False``: missing, unreadable, wrong size or checksum), and M's
   replica there is not FAILED (otherwise it would be placed straight back where it fails).
3. A GPU fits a new replica when its free memory, less what replicas already placed there will
   take once started ("pending"), covers the replica's need, and the memory fractions promised
   on it stay within ``memory_budget``; a replica of N GPUs needs N fitting GPUs of one class
   (the need is per GPU). Instances WARMING/READY/UNHEALTHY already hold their
   memory, so the measured free memory counts them; STARTING/RESTARTING/FAILED/STOPPED ones and
   replicas without an instance yet do not, so the plan charges them itself.
4. Stability first: a current assignment is kept unless it has a cause to move (model removed,
   node unknown, DOWN for ``reschedule_after_s`` or longer, drained, GPU gone/lost/of a class
   no longer allowed, path unavailable, instance FAILED). A kept replica is refreshed from the
   model record but stays on its node and GPU even when memory got tight: restarting a working
   replica elsewhere costs more than a fuller GPU. A DOWN node's replica counts within the grace
   time, so a short lease blip does not start a second copy (DOWN with no ``down_since``: moved
   at once, as nothing here can remember since when). DEGRADED is not a cause to move.
   More kept than wanted: drop instances not READY first, then those on nodes not READY, then
   by node name descending.
5. Missing replicas go to the best eligible node without one: path verified (True) before not
   yet checked (None), READY before DEGRADED, fewer replicas in this plan, for N > 1 GPUs the
   better worst link between them (a reported link before an unknown one), more free memory on
   the chosen GPUs (the least free of them), node name. On the node, the fitting GPUs with most
   free memory (then lowest index); for N GPUs, the set of one class whose worst link is best
   where the agent reports the interconnect (NVLink, then PCIe switch, host bridge, NUMA node,
   sockets: policy/gpusets.py), then the one that leaves the most. A replica whose GPUs are
   linked worse than N of its class on that node could be says so (log and status). Larger
   models are placed first (first-fit decreasing packs better); a model with no size wants a
   whole GPU, so it counts as the largest.
6. What cannot be placed is counted in ``unplaced`` with one reason line per distinct cause.
7. Make before break. A replica with a cause to move that still serves where it is (its
   instance READY on a node that is not DOWN: drained, its path gone bad, its class no longer
   allowed) is *retiring*: it stays assigned, and so running, while the model has replicas on
   their way elsewhere (assigned but not READY yet) and fewer READY ones than it wants; then it
   goes. Moving a single replica thus never leaves the model with nothing to serve it. (The
   routes keep a drained node's retiring replica routed while its model has no READY endpoint
   elsewhere: policy/routes.py.) When no replacement fits anywhere and the model lacks READY
   replicas, the retiring replica keeps serving, and its status says so: a drain never takes
   the last capacity away unannounced. A replica that does not serve any more goes at once.

Pure: no I/O, no clock, no logging; the same input (in any dict order) gives the same plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from coordinator.policy.gpusets import Links, choose, node_links, worst
from gpufleet.keyspace import assigned_instance_name
from gpufleet.keyspace.records import (
    LINK_NAMES,
    LINK_NVLINK,
    LINK_SELF,
    LINK_UNKNOWN,
    AssignedInstance,
    GpuRecord,
    InstanceRecord,
    ModelAvailability,
    ModelPlacement,
    ModelRecord,
    NodeRecord,
)
from gpufleet.registry import GIB, memory_share

# Instance states whose memory is not (or no longer) in the GPU's measured free memory.
_NOT_HOLDING = frozenset({"STARTING", "RESTARTING", "FAILED", "STOPPED"})
_SIZE_REF_BYTES = 80 * GIB  # a reference GPU, only to order models by size
_MAX_NAMES = 5  # node names listed in one reason line


@dataclass(frozen=True)
class PlacementPolicy:
    reschedule_after_s: float = 30.0  # replicas of a DOWN node move after this long
    memory_budget: float = 0.95  # sum of gpu_memory_fraction on one GPU may not exceed this

    def __post_init__(self) -> None:
        if self.reschedule_after_s < 0:
            raise ValueError("reschedule_after_s must not be negative")
        if not 0 < self.memory_budget <= 1:
            raise ValueError(f"memory_budget must be within (0, 1], not {self.memory_budget}")


DEFAULT_PLACEMENT = PlacementPolicy()


@dataclass(frozen=True)
class NodeView:
    record: NodeRecord | None  # None: the node's key is gone (lease expired)
    state: str  # "READY" | "DEGRADED" | "DOWN" (the leader's health view)
    down_since: float | None = None  # when it went DOWN / was first noticed missing; None: unknown
    drained: bool = False


@dataclass
class PlacementPlan:
    assignments: dict[str, list[AssignedInstance]] = field(default_factory=dict)  # node -> sorted by name
    status: dict[str, ModelPlacement] = field(default_factory=dict)  # every registered model
    moved: list[str] = field(default_factory=list)  # what changed, for the log


class _Lookup:
    """Per-call indexes: a node's instances and path reports by name, memory shares by GPU size.
    place() asks these for every (model, node) pair; scanning lists each time made a pass over
    1,000 nodes take seconds."""

    def __init__(self) -> None:
        self._insts: dict[int, dict[str, InstanceRecord]] = {}
        self._avail: dict[int, dict[str, ModelAvailability]] = {}
        self._shares: dict[tuple[str, int], tuple[float, int]] = {}
        self._links: dict[int, Links | None] = {}
        self._best_link: dict[tuple[int, str, int], int] = {}
        self._sets: dict[tuple[int, tuple[int, ...], int], tuple[int, list[int]]] = {}

    def instance(self, rec: NodeRecord, name: str) -> InstanceRecord | None:
        index = self._insts.get(id(rec))
        if index is None:
            index = self._insts[id(rec)] = {i.name: i for i in rec.instances}
        return index.get(name)

    def availability(self, rec: NodeRecord, model: str) -> ModelAvailability | None:
        index = self._avail.get(id(rec))
        if index is None:
            index = self._avail[id(rec)] = {a.model: a for a in rec.models}
        return index.get(model)

    def links(self, rec: NodeRecord) -> Links | None:
        key = id(rec)
        if key not in self._links:
            self._links[key] = node_links(rec)
        return self._links[key]

    def choose(self, rec: NodeRecord, ranked: tuple[int, ...], n: int) -> tuple[int, list[int]]:
        """gpusets.choose for the node, remembered: the models of one pass mostly see a node's
        GPUs in the same memory order (it changes where a replica is placed)."""
        key = (id(rec), ranked, n)
        hit = self._sets.get(key)
        if hit is None:
            hit = self._sets[key] = choose(ranked, n, self.links(rec))
        return hit

    def best_link(self, rec: NodeRecord, gpu_class: str, n: int) -> int:
        """The best worst-link level N GPUs of ``gpu_class`` on the node could have, room or not."""
        key = (id(rec), gpu_class, n)
        hit = self._best_link.get(key)
        if hit is None:
            ranked = sorted(g.index for g in rec.gpus if g.gpu_class == gpu_class and not g.lost)
            hit = choose(ranked, n, self.links(rec))[0] if len(ranked) >= n else LINK_UNKNOWN
            self._best_link[key] = hit
        return hit

    def share(self, m: ModelRecord, total: int) -> tuple[float, int]:
        key = (m.name, total)
        hit = self._shares.get(key)
        if hit is None:
            hit = self._shares[key] = memory_share(m, total)
        return hit


def _class_ok(m: ModelRecord, g: GpuRecord) -> bool:
    return not m.classes or g.gpu_class in m.classes


def _names(nodes: list[str]) -> str:
    nodes = sorted(set(nodes))
    more = f" and {len(nodes) - _MAX_NAMES} more" if len(nodes) > _MAX_NAMES else ""
    return ", ".join(nodes[:_MAX_NAMES]) + more


class _Ledger:
    """Per (node, GPU index): memory fractions promised, and bytes promised but not yet in use."""

    def __init__(self, nodes: dict[str, NodeView], look: _Lookup) -> None:
        self.look = look
        self.frac: dict[tuple[str, int], float] = {}
        self.pending: dict[tuple[str, int], int] = {}
        for node, view in nodes.items():
            for inst in view.record.instances if view.record else ():
                for i in inst.gpus:  # static and assigned instances alike
                    self.frac[(node, i)] = self.frac.get((node, i), 0.0) + (inst.gpu_memory_fraction or 0.0)

    def charge(self, node: str, rec: NodeRecord | None, inst: AssignedInstance, need: int) -> None:
        """``need``: bytes on each of the replica's GPUs."""
        if rec is None:
            return
        existing = self.look.instance(rec, inst.name)
        for index in inst.gpus:
            key = (node, index)
            if existing is None:  # with a record, its fraction is counted already
                self.frac[key] = self.frac.get(key, 0.0) + (inst.gpu_memory_fraction or 0.0)
            if existing is None or existing.state in _NOT_HOLDING:
                self.pending[key] = self.pending.get(key, 0) + need


def _keep_cause(
    m: ModelRecord | None,
    view: NodeView | None,
    a: AssignedInstance,
    now: float,
    policy: PlacementPolicy,
    look: _Lookup,
) -> str | None:
    """Why the current assignment ``a`` must go; None: keep it."""
    if m is None:
        return "model no longer registered"
    if view is None:
        return "node unknown"
    if len(a.gpus) != m.gpus_per_replica:
        return f"{len(a.gpus)} GPUs, model wants {m.gpus_per_replica} per replica"
    if view.state == "DOWN" or view.record is None:
        if view.down_since is None:  # the caller cannot say since when: do not wait forever
            return "node DOWN"
        if (down_for := now - view.down_since) >= policy.reschedule_after_s:
            return f"node DOWN for {down_for:.0f} s"
    if view.drained:
        return "node drained"
    rec = view.record
    if rec is None:  # DOWN within the grace time: nothing more to check against
        return None
    for index in a.gpus:
        g = next((g for g in rec.gpus if g.index == index), None)
        if g is None or g.lost:
            return f"GPU {index} {'lost' if g else 'gone'}"
        if not _class_ok(m, g):
            return f"GPU {g.index} is {g.gpu_class}, model allows {' or '.join(m.classes)}"
    av = look.availability(rec, m.name)
    if av is not None and av.available is False:
        return f"path unavailable: {av.error or 'check failed'}"
    inst = look.instance(rec, a.name)
    if inst is not None and inst.state == "FAILED":
        return f"instance FAILED: {inst.last_error or 'no error recorded'}"
    return None


def _serving(view: NodeView | None, a: AssignedInstance, look: _Lookup) -> bool:
    """Rule 7: the replica still serves where it is (READY, on a node not DOWN, no GPU lost)."""
    if view is None or view.record is None or view.state == "DOWN" or not a.gpus:
        return False
    inst = look.instance(view.record, a.name)
    gpus = {g.index: g for g in view.record.gpus}
    live = all(i in gpus and not gpus[i].lost for i in a.gpus)
    return inst is not None and inst.state == "READY" and live


def _retire(
    m: ModelRecord,
    retiring: list[tuple[str, AssignedInstance, str]],
    holders: set[str],
    placed_now: int,
    draft: _Draft,
) -> list[str]:
    """Rule 7: keep the retiring replicas of ``m`` while replacements are on their way
    (``placed_now`` of them placed by this pass: the move starts, and is logged, now), or while
    the model lacks READY replicas and no replacement fits anywhere (kept serving, and said so:
    the lines returned go into the model's placement status, not the log of every pass)."""
    notes: list[str] = []
    if not retiring:
        return notes
    ready = 0
    for node in holders:
        rec = draft.nodes[node].record
        inst = draft.look.instance(rec, assigned_instance_name(m.name)) if rec else None
        ready += inst is not None and inst.state == "READY"
    waiting = len(holders) - ready  # replacements assigned, not READY yet
    for node, a, cause in retiring:
        if node in holders:
            draft.moved.append(f"removed {m.name} from {node}: {cause}")  # placed there anew (another GPU)
        elif ready < m.replicas and (waiting > 0 or len(holders) < m.replicas):
            draft.by_node.setdefault(node, {})[m.name] = a  # unchanged: no assignment write, keeps running
            if placed_now:
                draft.moved.append(
                    f"moving {m.name} off {node}: {cause}; it serves there until its replacement is READY"
                )
            elif not waiting:
                notes.append(f"kept serving on {node} ({cause}): no capacity elsewhere for its replacement")
        else:
            done = "; its replacement is READY" if ready else ""
            draft.moved.append(f"removed {m.name} from {node}: {cause}{done}")
    return notes


def _keep_rank(
    nodes: dict[str, NodeView], entry: tuple[str, AssignedInstance], look: _Lookup
) -> tuple[bool, bool, str]:
    """Kept replicas beyond ``replicas`` are dropped from the end of this order."""
    view = nodes[entry[0]]
    inst = look.instance(view.record, entry[1].name) if view.record else None
    return (inst is None or inst.state != "READY", view.state != "READY", entry[0])


def _replica(m: ModelRecord, gpus: list[int], frac: float | None) -> AssignedInstance:
    return AssignedInstance(
        name=assigned_instance_name(m.name),
        model=m.name,
        path=m.path,
        backend=m.backend,
        gpus=list(gpus),
        gpu_memory_fraction=frac,
        args=list(m.args),
    )


# Per-node causes in _Why, in the order their lines are listed: {n} node names, {d} detail.
_CAUSE_TEXT = {
    "down": "{n} DOWN",
    "drained": "{n} drained",
    "lost": "GPU lost on {n}",
    "path": "path unavailable on {n}: {d}",
    "failed": "replica FAILED on {n}: {d}",
    "unknown": "GPU memory unknown on {n}",
}
_CAUSE_ORDER = list(_CAUSE_TEXT)


class _Why:
    """Why the last placement attempt of a model found no slot, gathered during the scan."""

    def __init__(self) -> None:
        self.causes: dict[tuple[str, str], list[str]] = {}  # (kind, detail) -> nodes
        self.class_seen = False
        self.eligible = 0  # nodes eligible (rule 2), holders included
        self.short: tuple[int, int, str, int] | None = None  # (free, need, node, GPU) most free, too small
        self.budget: tuple[float, float, str, int] | None = None  # (left, frac, node, GPU) most left, too small
        self.too_few = -1  # multi-GPU replicas: most fitting GPUs of one class on a node, when too few

    def add(self, kind: str, node: str, detail: str = "") -> None:  # returns None for _eligible's sake
        self.causes.setdefault((kind, detail), []).append(node)

    def reasons(self, m: ModelRecord, policy: PlacementPolicy) -> list[str]:
        out = []
        if not self.class_seen:
            out.append("no node has a GPU" + (f" of class {' or '.join(m.classes)}" if m.classes else ""))
        for (kind, detail), nodes in sorted(self.causes.items(), key=lambda c: (_CAUSE_ORDER.index(c[0][0]), c[0])):
            out.append(_CAUSE_TEXT[kind].format(n=_names(nodes), d=detail))
        if self.short:
            free, need, node, gpu = self.short
            out.append(
                f"insufficient GPU memory: needs {need / GIB:.1f} GiB, "
                f"most free is {max(free, 0) / GIB:.1f} GiB on {node} GPU {gpu}"
            )
        if self.budget:
            left, frac, node, gpu = self.budget
            out.append(
                f"GPU memory budget exceeded: needs a {frac:.2f} share, "
                f"at most {max(left, 0):.2f} left (budget {policy.memory_budget:.2f}) on {node} GPU {gpu}"
            )
        if self.too_few >= 0:
            out.append(
                f"no node has {m.gpus_per_replica} fitting GPUs of one class for a replica "
                f"(at most {self.too_few} on one node)"
            )
        if 0 < self.eligible < m.replicas:  # with none eligible, the lines above say it all
            n = self.eligible
            out.append(
                f"only {n} eligible node{'' if n == 1 else 's'} for {m.replicas} replicas (one replica per node)"
            )
        return out


def _eligible(m: ModelRecord, inst_name: str, node: str, view: NodeView, why: _Why, look: _Lookup) -> NodeRecord | None:
    """Rule 2: the node's record when it may take a replica of ``m``; else None, noting why."""
    rec = view.record
    if rec is None:
        return why.add("down", node)
    matching = [g for g in rec.gpus if _class_ok(m, g)]
    if not matching:
        return None  # no line per node: "no node has a GPU of class" covers the case that matters
    why.class_seen = True
    if view.state == "DOWN":
        return why.add("down", node)
    if view.drained:
        return why.add("drained", node)
    if all(g.lost for g in matching):
        return why.add("lost", node)
    av = look.availability(rec, m.name)
    if av is not None and av.available is False:
        return why.add("path", node, av.error or "check failed")
    inst = look.instance(rec, inst_name)
    if inst is not None and inst.state == "FAILED":  # else it would be placed straight back
        return why.add("failed", node, inst.last_error or "no error recorded")
    return rec


class _Slot(NamedTuple):
    """Where a replica of a model could go on one node."""

    least_free: int  # free after pending on the least free of its GPUs
    gpus: list[int]  # ascending
    frac: float  # one fraction for all of the replica's GPUs (one backend flag): the largest needed
    need: int  # bytes per GPU
    level: int  # worst link between two of its GPUs (LINK_*); LINK_SELF for one GPU
    gpu_class: str


def _best_gpus(
    m: ModelRecord, node: str, rec: NodeRecord, ledger: _Ledger, policy: PlacementPolicy, why: _Why
) -> _Slot | None:
    """The ``gpus_per_replica`` fitting GPUs of one class with the best worst link, then the most
    free memory on the least free of them (policy/gpusets.py), or None."""
    fitting: dict[str, list[tuple[int, int, float, int]]] = {}  # class -> (free, index, frac, need)
    for g in sorted(rec.gpus, key=lambda g: g.index):
        if g.lost or not _class_ok(m, g):
            continue
        if g.memory_total_bytes is None or g.memory_free_bytes is None:
            why.add("unknown", node)
            continue
        frac, need = ledger.look.share(m, g.memory_total_bytes)
        free = g.memory_free_bytes - ledger.pending.get((node, g.index), 0)
        left = policy.memory_budget - ledger.frac.get((node, g.index), 0.0)
        if free < need:
            if why.short is None or free > why.short[0]:
                why.short = (free, need, node, g.index)
        elif frac > left + 1e-9:
            if why.budget is None or left > why.budget[0]:
                why.budget = (left, frac, node, g.index)
        else:
            fitting.setdefault(g.gpu_class, []).append((free, g.index, frac, need))
    n = m.gpus_per_replica
    best = None
    for gpu_class, slots in fitting.items():
        if len(slots) < n:
            if n > 1:
                why.too_few = max(why.too_few, len(slots))
            continue
        ranked = sorted(slots, key=lambda s: (-s[0], s[1]))  # most free, then lowest index
        if n > 1 and ledger.look.links(rec) is not None:
            level, picks = ledger.look.choose(rec, tuple([s[1] for s in ranked]), n)
        else:  # one GPU, or the links unknown: the freest, as gpusets.choose would say
            level, picks = (LINK_SELF if n == 1 else LINK_UNKNOWN), list(range(n))
        chosen = [ranked[p] for p in picks]
        least_free = min(s[0] for s in chosen)
        if best is None or (level, -least_free) < (best.level, -best.least_free):
            gpus = sorted(s[1] for s in chosen)
            best = _Slot(least_free, gpus, max(s[2] for s in chosen), max(s[3] for s in chosen), level, gpu_class)
    return best


def _link_note(rec: NodeRecord, gpus: list[int], look: _Lookup) -> tuple[int, int] | None:
    """(level, best level there) when a multi-GPU replica on ``gpus`` spans a worse link than N
    GPUs of its class on that node could have (with room or not); None when it does not, or
    when the links are not known."""
    n = len(gpus)
    if n < 2 or (links := look.links(rec)) is None:
        return None
    level = worst(links, gpus)
    if level <= LINK_NVLINK or level >= LINK_UNKNOWN:
        return None
    g = next((g for g in rec.gpus if g.index == gpus[0]), None)
    best = look.best_link(rec, g.gpu_class, n) if g is not None else LINK_UNKNOWN
    return (level, best) if best < level else None


def _link_name(level: int) -> str:
    return LINK_NAMES.get(level, f"link level {level}")  # a level from a newer agent


def _link_notes(m: ModelRecord, holders: set[str], draft: _Draft) -> list[str]:
    """Status lines for ``m``'s replicas whose GPUs are linked worse than their node allows."""
    notes = []
    for node in sorted(holders):
        a, rec = draft.by_node[node].get(m.name), draft.nodes[node].record
        if a is not None and rec is not None and (found := _link_note(rec, a.gpus, draft.look)):
            level, best = found
            gpus = ",".join(map(str, a.gpus))
            notes.append(f"{node} GPUs {gpus} are linked through {_link_name(level)} (best there: {_link_name(best)})")
    return notes


def place(
    models: dict[str, ModelRecord],
    nodes: dict[str, NodeView],
    current: dict[str, list[AssignedInstance]],
    now: float,
    policy: PlacementPolicy = DEFAULT_PLACEMENT,
) -> PlacementPlan:
    """The assignments for every registered model (see the module docstring for the rules)."""
    look = _Lookup()
    draft = _Draft(nodes, look, _Ledger(nodes, look))
    kept, retiring = _sort_current(models, nodes, current, now, policy, draft)
    for name in sorted(kept):
        _keep(models[name], kept[name], draft)
    status: dict[str, ModelPlacement] = {}
    # Largest models first (first-fit decreasing packs better).
    for name in sorted(
        models, key=lambda n: (-look.share(models[n], _SIZE_REF_BYTES)[1] * models[n].gpus_per_replica, n)
    ):
        m = models[name]
        holders = {node for node, reps in draft.by_node.items() if name in reps}
        before = len(holders)
        why = _place_missing(m, holders, policy, draft)
        notes = _retire(m, retiring.get(name, []), holders, len(holders) - before, draft)
        if m.gpus_per_replica > 1:
            notes += _link_notes(m, holders, draft)
        status[name] = _status(m, holders, why, policy, notes)
    return PlacementPlan(assignments=draft.assignments(), status=dict(sorted(status.items())), moved=draft.moved)


class _Draft:
    """The plan being built: node -> model -> replica, the ledger it charges, and what changed."""

    def __init__(self, nodes: dict[str, NodeView], look: _Lookup, ledger: _Ledger) -> None:
        self.nodes = nodes
        self.look = look
        self.ledger = ledger
        self.by_node: dict[str, dict[str, AssignedInstance]] = {}
        self.moved: list[str] = []  # for the log

    def assign(self, node: str, m: ModelRecord, gpus: list[int], frac: float | None, need: int) -> None:
        self.by_node.setdefault(node, {})[m.name] = inst = _replica(m, gpus, frac)
        self.ledger.charge(node, self.nodes[node].record, inst, need)

    def assignments(self) -> dict[str, list[AssignedInstance]]:
        return {
            node: sorted(reps.values(), key=lambda a: a.name) for node, reps in sorted(self.by_node.items()) if reps
        }


def _sort_current(
    models: dict[str, ModelRecord],
    nodes: dict[str, NodeView],
    current: dict[str, list[AssignedInstance]],
    now: float,
    policy: PlacementPolicy,
    draft: _Draft,
) -> tuple[dict[str, list[tuple[str, AssignedInstance]]], dict[str, list[tuple[str, AssignedInstance, str]]]]:
    """Rules 4 and 7: each current assignment is kept, retiring (decided after placing), or removed.
    Returns (kept, retiring), both by model."""
    kept: dict[str, list[tuple[str, AssignedInstance]]] = {}
    retiring: dict[str, list[tuple[str, AssignedInstance, str]]] = {}
    for node in sorted(current):
        for a in sorted(current[node], key=lambda a: (a.name, a.model, a.gpus)):
            if any(n == node for n, _ in kept.get(a.model, ())):
                draft.moved.append(f"removed {a.model} from {node}: duplicate assignment")
            elif cause := _keep_cause(models.get(a.model), nodes.get(node), a, now, policy, draft.look):
                if a.model in models and _serving(nodes.get(node), a, draft.look):
                    retiring.setdefault(a.model, []).append((node, a, cause))
                else:
                    draft.moved.append(f"removed {a.model} from {node}: {cause}")
            else:
                kept.setdefault(a.model, []).append((node, a))
    return kept, retiring


def _keep(m: ModelRecord, kept: list[tuple[str, AssignedInstance]], draft: _Draft) -> None:
    """Rule 4: up to ``replicas`` kept replicas stay on their node and GPU, refreshed from the model
    record; the rest are dropped in ``_keep_rank`` order."""
    entries = sorted(kept, key=lambda e: _keep_rank(draft.nodes, e, draft.look))
    for node, _ in entries[max(m.replicas, 0) :]:
        draft.moved.append(f"removed {m.name} from {node}: replicas reduced to {m.replicas}")
    for node, a in entries[: max(m.replicas, 0)]:
        rec = draft.nodes[node].record
        g = next((g for g in rec.gpus if g.index == a.gpus[0]), None) if rec else None
        frac, need = a.gpu_memory_fraction, 0  # memory unknown: keep what the replica was given
        if g is not None and g.memory_total_bytes:
            frac, need = draft.look.share(m, g.memory_total_bytes)
        draft.assign(node, m, a.gpus, frac, need)


def _place_missing(m: ModelRecord, holders: set[str], policy: PlacementPolicy, draft: _Draft) -> _Why:
    """Rule 5: the replicas ``m`` lacks go to the best eligible nodes; ``holders`` gains them.

    One scan of the nodes per model: placing a replica on a node changes only that node's ledger,
    and that node is then out (one replica per node), so the other candidates' slots stay valid
    for the model's next replica."""
    why = _Why()
    if len(holders) >= m.replicas:
        return why
    why.eligible = len(holders)  # a holder is (or, DOWN within the grace time, was) eligible
    why.class_seen = bool(holders)
    candidates = _candidates(m, holders, policy, draft, why)
    for (*_, node), slot in candidates[: m.replicas - len(holders)]:
        gpus = slot.gpus
        draft.assign(node, m, gpus, slot.frac, slot.need)
        holders.add(node)
        line = f"placed {m.name} on {node} GPU{'s' if len(gpus) > 1 else ''} {','.join(map(str, gpus))}"
        if (rec := draft.nodes[node].record) is not None and (found := _link_note(rec, gpus, draft.look)):
            level, best = found
            line += f" linked through {_link_name(level)}: no {len(gpus)} GPUs on {_link_name(best)} have room"
        draft.moved.append(line)
    return why


def _candidates(
    m: ModelRecord, holders: set[str], policy: PlacementPolicy, draft: _Draft, why: _Why
) -> list[tuple[tuple[bool, bool, int, int, int, str], _Slot]]:
    """(rank, slot) of every eligible node without a replica of ``m`` that has a fitting GPU, best first."""
    inst_name = assigned_instance_name(m.name)
    candidates = []
    for node in sorted(draft.nodes):
        view = draft.nodes[node]
        if node in holders or (rec := _eligible(m, inst_name, node, view, why, draft.look)) is None:
            continue
        why.eligible += 1
        if (slot := _best_gpus(m, node, rec, draft.ledger, policy, why)) is None:
            continue
        av = draft.look.availability(rec, m.name)
        verified = av is not None and av.available is True
        replicas = len(draft.by_node.get(node, {}))
        rank = (not verified, view.state != "READY", replicas, slot.level, -slot.least_free, node)
        candidates.append((rank, slot))
    candidates.sort()
    return candidates


def _status(m: ModelRecord, holders: set[str], why: _Why, policy: PlacementPolicy, notes: list[str]) -> ModelPlacement:
    """Rule 6: where the model runs, and why replicas are missing (and which of them a retiring
    replica stands in for)."""
    unplaced = max(m.replicas - len(holders), 0)
    return ModelPlacement(
        model=m.name,
        desired=m.replicas,
        nodes=sorted(holders),
        unplaced=unplaced,
        reasons=(why.reasons(m, policy) if unplaced else []) + notes,
    )
