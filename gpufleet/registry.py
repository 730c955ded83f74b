"""Registered models on shared storage: what a valid registry entry is, and how a host checks
that a model's path is really there.

Shared by ``gpuctl models add`` (refuses a bad entry before it reaches etcd), the leader (skips
a bad entry found in etcd) and the agent (checks the path on its host). The checks here block
on the file system: the agent runs them in a worker thread.

A model is a file (GGUF) or a directory (Hugging Face layout). ``size_bytes`` is the file's size
or the sum of the regular files under the directory. ``sha256`` is the file's digest, or for a
directory the digest of its manifest, which an operator can compute with coreutils::

    (cd DIR && find . -type f -printf '%P\\0' | LC_ALL=C sort -z | xargs -0 sha256sum) | sha256sum

(``gpuctl models digest PATH`` prints the same value).
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import PurePosixPath

from gpufleet.keyspace import InvalidName, check_model
from gpufleet.keyspace.records import ModelRecord, NodeRecord

GIB = 1024**3
DEFAULT_GPU_MEMORY_FRACTION = 0.9  # vLLM's default gpu_memory_utilization: "the whole GPU"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CLASS = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
_CHUNK = 1024 * 1024
MAX_IDLE_UNLOAD_S = 7 * 86400


def min_replicas(rec: ModelRecord) -> int:
    """Replicas the model keeps while nobody asks for it (``replicas`` unless on demand)."""
    return rec.replicas if rec.min_replicas is None else rec.min_replicas


def on_demand(rec: ModelRecord) -> bool:
    """Whether the model is scaled by demand: fewer replicas while idle than while wanted."""
    return min_replicas(rec) < rec.replicas


def autoscaled(rec: ModelRecord) -> bool:
    """Whether the leader scales the model between ``replicas`` and ``max_replicas`` by load."""
    return rec.max_replicas is not None and rec.max_replicas > rec.replicas


def max_replicas(rec: ModelRecord) -> int:
    """The most replicas the model may run (``replicas`` unless autoscaled)."""
    return rec.max_replicas if autoscaled(rec) and rec.max_replicas is not None else rec.replicas


def validate_model(rec: ModelRecord) -> list[str]:
    """Every problem with a registry entry, as ``field: message`` lines (empty: valid)."""
    out = []
    try:
        check_model(rec.name)
    except InvalidName as e:
        out.append(f"name: {e}")
    out.extend(f"path: {p}" for p in path_problems(rec.path))
    if not 0 <= rec.replicas <= 1000:
        out.append("replicas: must be between 0 and 1000")
    if rec.min_replicas is not None and not 0 <= rec.min_replicas <= rec.replicas:
        out.append(f"min_replicas: must be between 0 and replicas ({rec.replicas})")
    if not 1 <= rec.idle_unload_after_s <= MAX_IDLE_UNLOAD_S:
        out.append(f"idle_unload_after_s: must be between 1 and {MAX_IDLE_UNLOAD_S} (7 days)")
    if not 1 <= rec.gpus_per_replica <= 16:
        out.append("gpus_per_replica: must be between 1 and 16")
    out.extend(_autoscale_problems(rec))
    if rec.min_vram_gib is not None and not 0 < rec.min_vram_gib <= 4096:
        out.append("min_vram_gib: must be more than 0 and at most 4096")
    if rec.gpu_memory_fraction is not None and not 0 < rec.gpu_memory_fraction <= 1:
        out.append("gpu_memory_fraction: must be more than 0 and at most 1")
    for c in rec.classes:
        if not _CLASS.match(c):
            out.append(f"classes: invalid GPU class {c!r}")
    if rec.size_bytes is not None and rec.size_bytes < 0:
        out.append("size_bytes: must not be negative")
    if rec.sha256 is not None and not _SHA256.match(rec.sha256):
        out.append("sha256: must be 64 lowercase hex digits")
    if rec.fallback is not None:
        if rec.fallback == rec.name:
            out.append("fallback: a model cannot be its own fallback")
        try:
            check_model(rec.fallback)
        except InvalidName as e:
            out.append(f"fallback: {e}")
    for a in rec.args:
        if "\n" in a or "\0" in a:
            out.append("args: an argument contains a newline or NUL")
    return out


def _autoscale_problems(rec: ModelRecord) -> list[str]:
    """``max_replicas`` and its thresholds; the scaling fields are checked even without it (an
    entry keeps them when max_replicas is set later with --update)."""
    out = []
    if rec.max_replicas is not None:
        if not rec.replicas <= rec.max_replicas <= 1000:
            out.append(f"max_replicas: must be between replicas ({rec.replicas}) and 1000")
        elif rec.replicas == 0 and rec.max_replicas > 0:
            # The load that scales a model up is measured on its running replicas.
            out.append("max_replicas: needs replicas >= 1 (the load is measured on running replicas)")
    if not 0 <= rec.scale_down_waiting < rec.scale_up_waiting <= 10000:
        out.append(
            "scale_up_waiting, scale_down_waiting: need 0 <= scale_down_waiting < scale_up_waiting <= 10000 "
            "(the band between them is the hysteresis)"
        )
    for name in ("scale_up_after_s", "scale_down_after_s", "scale_cooldown_s"):
        if not 0 <= getattr(rec, name) <= MAX_IDLE_UNLOAD_S:
            out.append(f"{name}: must be between 0 and {MAX_IDLE_UNLOAD_S} (7 days)")
    return out


def fleet_problems(rec: ModelRecord, nodes: Iterable[NodeRecord]) -> list[str]:
    """What the registered fleet cannot hold, whatever the load: ``max_replicas`` replicas need
    that many nodes (one replica per node) each with ``gpus_per_replica`` GPUs of one allowed
    class. Empty when no node is registered (nothing to judge by yet)."""
    nodes = list(nodes)
    top = max_replicas(rec)
    if not nodes or not autoscaled(rec):
        return []
    fit = 0
    for n in nodes:
        per_class: dict[str, int] = {}
        for g in n.gpus:
            if not g.lost and (not rec.classes or g.gpu_class in rec.classes):
                per_class[g.gpu_class] = per_class.get(g.gpu_class, 0) + 1
        fit += max(per_class.values(), default=0) >= rec.gpus_per_replica
    if fit >= top:
        return []
    where = f" of class {' or '.join(rec.classes)}" if rec.classes else " of one class"
    return [
        f"max_replicas: {top} replicas need {top} nodes with {rec.gpus_per_replica} GPU(s){where} each "
        f"(one replica per node); the cluster has {fit}"
    ]


def path_problems(path: str) -> list[str]:
    """A model path must be absolute and normalised: it is the same string on every host, and
    "/mnt/models/../../etc" must not be a way to point a model server at something else."""
    if not path:
        return ["required"]
    if "\0" in path or "\n" in path:
        return ["contains a NUL or newline"]
    if not path.startswith("/"):
        return [f"{path!r} is not absolute"]
    parts = PurePosixPath(path).parts
    if ".." in parts or "." in path.split("/") or "//" in path or (path != "/" and path.endswith("/")):
        return [f"{path!r} is not normalised (no '.', '..', '//' or trailing '/')"]
    if path == "/":
        return ["the root directory is not a model"]
    return []


def memory_share(rec: ModelRecord, gpu_total_bytes: int) -> tuple[float, int]:
    """(gpu_memory_fraction, bytes needed) of one replica on a GPU with ``gpu_total_bytes``.

    The fraction is rounded up to whole percents (what backends take as a flag); without a
    minimum it is the whole GPU in vLLM's sense (0.9)."""
    if rec.gpu_memory_fraction is not None:
        frac = rec.gpu_memory_fraction
    elif rec.min_vram_gib is not None and gpu_total_bytes > 0:
        frac = min(1.0, math.ceil(rec.min_vram_gib * GIB / gpu_total_bytes * 100 - 1e-9) / 100)
    else:
        frac = DEFAULT_GPU_MEMORY_FRACTION
    need = int(frac * gpu_total_bytes)
    if rec.min_vram_gib is not None:
        need = max(need, int(rec.min_vram_gib * GIB))
    return frac, need


# --- checks on a host (blocking: run in a thread) --------------------------------------------


@dataclass(frozen=True)
class PathCheck:
    available: bool
    verified: bool  # size and/or sha256 were given and matched
    error: str | None = None


def _files(root: str) -> list[tuple[str, str]]:
    """(relative path, absolute path) of the regular files under ``root``, sorted like
    ``LC_ALL=C sort`` sorts them (by bytes)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=_raise):
        dirnames.sort()
        for f in filenames:
            full = os.path.join(dirpath, f)
            if stat.S_ISREG(os.stat(full).st_mode):
                out.append((os.path.relpath(full, root), full))
    out.sort(key=lambda t: os.fsencode(t[0]))
    return out


def _raise(e: OSError) -> None:
    raise e


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def model_size(path: str) -> int:
    st = os.stat(path)
    if stat.S_ISDIR(st.st_mode):
        return sum(os.stat(full).st_size for _, full in _files(path))
    return st.st_size


def model_digest(path: str) -> str:
    """sha256 of a file, or of a directory's ``sha256sum`` manifest (see the module doc)."""
    if not os.path.isdir(path):
        return _file_sha256(path)
    manifest = hashlib.sha256()
    for rel, full in _files(path):
        manifest.update(f"{_file_sha256(full)}  {rel}\n".encode("utf-8", "surrogateescape"))
    return manifest.hexdigest()


def check_path(path: str, size_bytes: int | None = None, sha256: str | None = None, *, full: bool = True) -> PathCheck:
    """Is the model at ``path`` present and readable here (and of the registered size and
    digest, when ``full`` and they are given)? Never raises."""
    try:
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            os.listdir(path)  # readable directory (a dead CephFS mount fails here)
            if not any(True for _ in _files(path)[:1]):
                return PathCheck(False, False, f"{path}: directory has no files")
        elif stat.S_ISREG(st.st_mode):
            with open(path, "rb") as f:
                f.read(1)
        else:
            return PathCheck(False, False, f"{path}: not a regular file or directory")
        if not full or (size_bytes is None and sha256 is None):
            return PathCheck(True, False)
        if size_bytes is not None and (actual := model_size(path)) != size_bytes:
            return PathCheck(False, False, f"{path}: size {actual} bytes, registered {size_bytes}")
        if sha256 is not None and (digest := model_digest(path)) != sha256:
            return PathCheck(False, False, f"{path}: sha256 {digest[:16]}…, registered {sha256[:16]}…")
        return PathCheck(True, True)
    except OSError as e:
        return PathCheck(False, False, f"{path}: {e.strerror or e}")
