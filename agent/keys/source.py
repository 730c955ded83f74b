"""Where an agent's API keys come from, and how they stay current.

In a cluster the keys are mirrored from ``/gpufleet/<cluster>/keys/`` (list-then-watch): a
revocation reaches every agent as fast as a watch event, well within 2 s. When etcd goes away
the mirror keeps the last set, so clients go on being served and every revocation made before
the outage stays in force. Each set the mirror applies is also written to a cache file in the
agent's state directory, so an agent *restarted* during an etcd outage starts from the last set
it knew instead of refusing everyone (or, worse, accepting everyone); the mirror replaces the
cache's set as soon as etcd answers. A standalone agent reads a keys file (the same records as
JSON, written by ``gpuctl keys … --file``) at start and on reload.

Nothing here fails open. Before any set is known (a first start with etcd down and no cache)
``index`` is None and requests are refused with 503; a record that does not decode refuses that
key's secrets (the last good version of the record is *not* kept: the bad one may have been
meant as a revocation).
"""

from __future__ import annotations

import time
from pathlib import Path

import msgspec
import structlog

from gpufleet.apikeys import KeyIndex, KeysFile
from gpufleet.etcd import Change, EtcdClient, KeyMirror
from gpufleet.fileio import atomic_write_bytes
from gpufleet.keyspace import Keyspace, decode_or_skip
from gpufleet.keyspace.records import ApiKeyRecord, KeySharesRecord

log = structlog.get_logger("agent.keys")

CACHE_NAME = "api-keys.json"


class KeysFileError(Exception):
    pass


class CachedKeys(msgspec.Struct, kw_only=True):
    """The cache file: the last key set the mirror applied, and the etcd revision it reflects."""

    revision: int
    saved_at: float
    keys: list[ApiKeyRecord] = []


def read_keys_file(path: Path) -> list[ApiKeyRecord]:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise KeysFileError(f"{path}: cannot read the keys file: {e.strerror or e}") from None
    try:
        return msgspec.json.decode(data, type=KeysFile).keys
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise KeysFileError(f"{path}: not a keys file (write it with gpuctl keys create --file): {e}") from None


class KeySource:
    """The key set requests are checked against: ``index`` (None until one is known)."""

    def __init__(self) -> None:
        self.index: KeyIndex | None = None
        self.origin = "none"  # "etcd", "cache", "file": where the current set came from
        self.revision = 0  # etcd revision of the set (0 for a file)

    def _use(self, records: list[ApiKeyRecord], origin: str, revision: int = 0) -> None:
        self.index = KeyIndex(records)
        self.origin, self.revision = origin, revision

    def share(self, key: str, node: str) -> float | None:
        """This node's share of ``key``'s fleet-wide limits as the leader divided them; None:
        no division for the key (the gate then divides evenly)."""
        return None

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def reload(self) -> None:
        pass


class FileKeySource(KeySource):
    """A standalone agent's keys file: read at start (an unreadable file stops the start) and on
    every reload (an unreadable file then keeps the set in force, and says so)."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self._use(read_keys_file(path), "file")

    def reload(self) -> None:
        try:
            records = read_keys_file(self.path)
        except KeysFileError as e:
            log.error("keys file not reloaded; the keys in force stay", error=str(e))
            return
        self._use(records, "file")
        log.info("keys file reloaded", keys=len(records))


class EtcdKeySource(KeySource):
    def __init__(self, etcd: EtcdClient, keys: Keyspace, cache_dir: Path | None) -> None:
        super().__init__()
        self.keys = keys
        self.cache = cache_dir / CACHE_NAME if cache_dir else None
        self._mirror = KeyMirror(etcd, keys.api_keys, on_change=self._on_change)
        # The leader's division of each limited key among the entry nodes (keyshare_loop.py).
        self._shares_mirror = KeyMirror(etcd, keys.keyshares, on_change=self._on_shares)
        self.shares: KeySharesRecord | None = None
        self._load_cache()

    async def start(self) -> None:
        self._mirror.start()
        self._shares_mirror.start()

    async def stop(self) -> None:
        await self._mirror.stop()
        await self._shares_mirror.stop()

    def share(self, key: str, node: str) -> float | None:
        division = self.shares.keys.get(key) if self.shares is not None else None
        if division is None:
            return None
        return division.nodes.get(node, division.idle)

    def _on_shares(self, change: Change) -> None:
        kv = self._shares_mirror.data.get(self.keys.keyshares)
        if kv is None:
            self.shares = None
            return
        rec = decode_or_skip(kv.key_str, kv.value, KeySharesRecord, kv.mod_revision)
        if rec is not None:  # a bad record: the last division stays (it sums to 1 too)
            self.shares = rec

    async def wait_current(self, timeout: float) -> None:
        """Until the set comes from etcd (not from the cache)."""
        await self._mirror.wait_ready(timeout)

    def _load_cache(self) -> None:
        if self.cache is None or not self.cache.exists():
            return
        try:
            cached = msgspec.json.decode(self.cache.read_bytes(), type=CachedKeys)
        except (OSError, msgspec.DecodeError, msgspec.ValidationError) as e:
            log.error("API key cache unreadable; no keys until etcd answers", path=str(self.cache), error=str(e))
            return
        self._use(cached.keys, "cache", cached.revision)
        age = time.time() - cached.saved_at
        log.info("API keys from the cache until etcd answers", keys=len(cached.keys), age_s=round(age))

    def _on_change(self, change: Change) -> None:
        records = []
        for kv in self._mirror.data.values():
            rec = decode_or_skip(kv.key_str, kv.value, ApiKeyRecord, kv.mod_revision)
            if rec is not None:  # a bad record refuses its key: see the module's docstring
                records.append(rec)
        self._use(records, "etcd", self._mirror.revision)
        self._save_cache(records)

    def _save_cache(self, records: list[ApiKeyRecord]) -> None:
        if self.cache is None:
            return
        doc = CachedKeys(revision=self._mirror.revision, saved_at=time.time(), keys=records)
        try:
            atomic_write_bytes(self.cache, msgspec.json.encode(doc), 0o600)
        except OSError as e:  # a full disk must not stop the mirror: the set in memory is current
            log.warning("API key cache not written", path=str(self.cache), error=str(e))
