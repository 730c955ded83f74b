"""Cluster mode: keep this node's record in etcd under a lease.

    register: read the node key; if another agent holds it under a live lease (a duplicate
        node_id: identity.py), refuse: keep serving locally, unregistered, and try again every
        TTL/3 until that lease ends (the other agent stopped or died). Otherwise grant a lease
        and put the record in one txn guarded by the key's mod revision as read (absent: create
        revision 0), so a registration never lands over one that changed meanwhile; then revoke
        our own previous lease, if the record was under one (a restart takes over at once)
    maintain: keep-alive every TTL/3; publish on meaningful change or every 30 s
    lease lost (expired while we were frozen or cut off, or no keep-alive answered for a whole
        TTL): register again, retrying at least every TTL/3 (jittered). After etcd loses quorum
        and regains it, the old lease lives on for a TTL (a new raft leader extends every
        lease), so registering within that window replaces the record's lease without the key
        ever going away: the node is not failed over by the cluster's own recovery. A longer
        back-off would race that expiry.
    keep-alive or a write failing (for less than a TTL): keep serving locally and the lease, try
        again in ~1 s
    every publish is a txn guarded by "the key is under our lease": a record that another agent
        took legitimately (ours expired) is never overwritten; we re-register, and are refused
    every state change is logged once; a refusal is an error naming the other holder's address,
        repeated at most every REFUSED_LOG_EVERY_S while it lasts
    stop (SIGTERM): revoke the lease, so the cluster fails over at once instead of after a TTL;
        but a restart that hands the model servers over leaves it: the next agent takes the
        registration over within seconds, and if none comes the lease expires in a TTL

The agent's data plane never waits on any of this: the publisher runs beside it and a failure
here changes nothing about local serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
import structlog
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agent.config import ClusterSection
from gpufleet.backoff import HALF_JITTER, backoff_delay
from gpufleet.etcd import Compare, EtcdClient, EtcdError, EtcdLeaseNotFound, Op
from gpufleet.keyspace import Keyspace, encode
from gpufleet.keyspace.records import NodeRecord
from gpufleet.tasks import cancel_and_wait, wait_set

from .identity import OtherHolder, agent_identity, other_holder
from .publish_policy import PublishPolicy, held_for, publish_reason

log = structlog.get_logger("agent.cluster")

REFUSED_LOG_EVERY_S = 60.0  # a refusal that lasts is repeated this often, not on every retry


class _LeaseLost(Exception):
    pass


class _Refused(Exception):
    def __init__(self, holder: OtherHolder) -> None:
        super().__init__(holder.describe())
        self.holder = holder


class ClusterPublisher:
    def __init__(
        self,
        cfg: ClusterSection,
        node_id: str,
        snapshot: Callable[[], NodeRecord],
        client: EtcdClient | None = None,
        *,
        state_dir: str | None = None,
        on_refusal: Callable[[], None] = lambda: None,
    ) -> None:
        self.cfg = cfg
        self.node_id = node_id
        self.snapshot = snapshot
        self.identity = agent_identity(state_dir)
        self.keys = Keyspace(cfg.cluster)
        self.key = self.keys.node(node_id)
        self.policy = PublishPolicy(
            interval_s=cfg.publish_interval_s,
            min_gap_s=cfg.publish_min_gap_s,
            telemetry_gap_s=cfg.telemetry_min_gap_s,
            temperature_delta_c=cfg.temperature_delta_c,
            temperature_urgent_c=cfg.temperature_urgent_c,
            utilization_delta_percent=cfg.utilization_delta_percent,
        )
        self._client = client
        self.state = "starting"
        self.lease_id: int | None = None
        self.writes = 0
        self._published: NodeRecord | None = None
        self._published_at = 0.0
        self._poke = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # Another agent holds our node_id (None: not refused now); refusals counted since start.
        self.refused_by: OtherHolder | None = None
        self._on_refusal = on_refusal  # called when refused_by goes from None to set, or back
        self.refusals = 0
        self._refused_logged_at = float("-inf")

    @property
    def etcd(self) -> EtcdClient:
        assert self._client is not None
        return self._client

    async def start(self) -> None:
        if self._client is None:
            self._client = self.cfg.client()
        await self._client.__aenter__()
        self._task = asyncio.create_task(self._run(), name="cluster-publisher")

    def poke(self) -> None:
        """Something may have changed: check the publish policy now."""
        self._poke.set()

    def republish(self) -> None:
        """etcd's history went backwards (restored from a backup, or wiped): the record there
        may be one from the backup, whatever we published since. Write ours again now."""
        self._published = None
        self._poke.set()

    async def stop(self, revoke: bool = True) -> None:
        """Stop publishing; ``revoke`` the lease unless the next agent takes the registration
        over (a restart that hands the model servers over: the node stays in the routes, and
        requests forwarded here meanwhile wait in the handed-over socket's backlog)."""
        await cancel_and_wait(self._task)
        if self.lease_id is not None and not revoke:
            log.info("lease left for the next agent to take over", lease=self.lease_id)
            self.lease_id = None
        if self.lease_id is not None:
            try:
                await self.etcd.lease_revoke(self.lease_id, timeout=min(2.0, self.cfg.timeout_s))
                log.info("lease revoked; node deregistered", lease=self.lease_id)
            except EtcdError as e:
                log.warning("could not revoke lease; the node key expires with it", error=str(e))
            self.lease_id = None
        if self._client is not None:
            await self._client.close()

    # --- the loop ----------------------------------------------------------------------------

    async def _run(self) -> None:
        failures = 0
        while True:
            try:
                await self._register()
                failures = 0
                await self._maintain()
            except _LeaseLost as e:
                self._set_state("re-registering", reason=str(e))
            except _Refused as e:
                self._refused(e.holder)
                # Not sooner: the holder's lease must really end first; TTL/3 keeps the takeover
                # within a TTL of it ending, jittered like every retry here.
                await asyncio.sleep(self.cfg.keepalive_s * random.uniform(0.8, 1.0))
            except EtcdError as e:
                failures += 1
                self._set_state("unreachable", error=str(e))
                # Back off, jittered so 1,000 agents do not arrive at a recovering etcd together,
                # and capped at TTL/3 (see top).
                delay = backoff_delay(failures, 0.5, min(10.0, self.cfg.lease_ttl_s / 3), HALF_JITTER)
                await asyncio.sleep(delay)
            except Exception as e:  # a bug must not end cluster membership for good
                log.exception("cluster publisher error", error=str(e))
                await asyncio.sleep(5.0)

    async def _register(self) -> None:
        self.lease_id = None
        previous = await self.etcd.get(self.key)
        rec = self.snapshot()
        holder = other_holder(previous, self.node_id, self.identity, rec.address)
        if holder is not None:
            raise _Refused(holder)
        lease = await self.etcd.lease_grant(self.cfg.lease_ttl_s)
        # One atomic txn: put only over the record as we read it (or none), so a registration
        # racing ours (the other agent's, or etcd's expiry of a lease) is read again, not hit.
        guard = (
            Compare.absent(self.key)
            if previous is None
            else Compare.mod_revision(self.key, "==", previous.mod_revision)
        )
        try:
            done = await self.etcd.txn([guard], [Op.put(self.key, self._encode(rec), lease=lease.id)])
        except EtcdError:
            with contextlib.suppress(EtcdError):
                await self.etcd.lease_revoke(lease.id)
            raise
        if not done.succeeded:
            with contextlib.suppress(EtcdError):
                await self.etcd.lease_revoke(lease.id)
            raise _LeaseLost("the node key changed while registering; reading it again")
        self.lease_id = lease.id
        self._published_now(rec, "register")
        if previous is not None and previous.lease and previous.lease != lease.id:
            # Our own earlier registration (agent restarted, or we lost contact): revoke its lease
            # now rather than let it linger until its TTL runs out.
            with contextlib.suppress(EtcdLeaseNotFound):
                await self.etcd.lease_revoke(previous.lease)
            log.info("took over the registration of a previous lease", old_lease=previous.lease)
        if self.refused_by is not None:
            log.warning(
                "registered: the other agent's registration of this node_id ended",
                other=self.refused_by.address,
                refusals=self.refusals,
            )
            self.refused_by = None
            self._on_refusal()
        self._set_state("registered", lease=lease.id, ttl=lease.ttl)

    def _refused(self, holder: OtherHolder) -> None:
        """Refused: log (an error, rate-limited, at once when the holder changes), count, show."""
        self.refusals += 1
        now = time.monotonic()
        if holder != self.refused_by or now - self._refused_logged_at >= REFUSED_LOG_EVERY_S:
            log.error(
                "registration refused: another agent holds this node_id; not registered, serving "
                "locally only, retrying until its lease ends (give one of them another node_id)",
                node=self.node_id,
                other_address=holder.address,
                other_agent_id=holder.agent_id,
                other_lease=f"{holder.lease:x}",
                our_address=self.snapshot().address,
                refusals=self.refusals,
            )
            self._refused_logged_at = now
        first = self.refused_by is None
        self.refused_by = holder
        if first:
            self._on_refusal()
        self.state = "refused"  # logged above; _set_state would log a second, vaguer line

    def status(self) -> dict[str, Any]:
        """What /v1/status and /healthz show of cluster membership."""
        out: dict[str, Any] = {"state": self.state, "agent_id": self.identity, "lease": self.lease_id}
        if self.refused_by is not None:
            out["error"] = self.refused_by.describe() + "; this agent is not registered"
            out["other_address"] = self.refused_by.address
            out["refusals"] = self.refusals
        return out

    async def _maintain(self) -> None:
        loop = asyncio.get_running_loop()
        lease_deadline = loop.time() + self.cfg.lease_ttl_s
        next_keepalive = loop.time() + self.cfg.keepalive_s
        publish_not_before = 0.0  # after a failed write: when to try again
        held_until = math.inf  # a change held back by its gap goes out then
        while True:
            refresh = self._published_at_loop() + self.policy.interval_s
            due = max(min(refresh, held_until), publish_not_before)
            wait = max(0.0, min(next_keepalive, due) - loop.time())
            await wait_set(self._poke, wait)
            self._poke.clear()
            if loop.time() >= next_keepalive:
                try:
                    remaining = await self.etcd.lease_keepalive_once(self.lease_id or 0)
                except EtcdLeaseNotFound:
                    raise _LeaseLost("lease expired") from None
                except EtcdError as e:
                    # Past a whole TTL the lease is given up even though etcd may have kept it
                    # (no quorum, no expiry): a keep-alive that timed out may still have renewed
                    # it, and a node whose renewals land but whose answers are lost (half-open)
                    # must not stay in the routes forever. Nothing is published meanwhile.
                    if loop.time() >= lease_deadline:
                        raise _LeaseLost(f"no keep-alive for a whole TTL: {e}") from None
                    self._set_state("keepalive failing", error=str(e))
                    next_keepalive = loop.time() + min(1.0, self.cfg.keepalive_s / 2) * random.uniform(0.8, 1.2)
                    continue
                if remaining <= 0:
                    raise _LeaseLost("lease expired")
                lease_deadline = loop.time() + remaining
                next_keepalive = loop.time() + self.cfg.keepalive_s
                self._set_state("registered", lease=self.lease_id, ttl=remaining)
            if loop.time() < publish_not_before:
                continue
            cur = self.snapshot()
            since = time.monotonic() - self._published_at
            why = publish_reason(self._published, cur, since, self.policy)
            held = held_for(self._published, cur, since, self.policy) if why is None else None
            # Not less than 10 ms: the loop's clock and time.monotonic may disagree by a hair.
            held_until = loop.time() + max(held, 0.01) if held is not None else math.inf
            if why is not None:
                try:
                    await self._publish(cur, why)
                except EtcdLeaseNotFound:
                    raise _LeaseLost("lease expired") from None
                except _LeaseLost:
                    raise
                except EtcdError as e:
                    self._set_state("keepalive failing", error=f"publishing: {e}")
                    publish_not_before = loop.time() + random.uniform(0.8, 1.2)

    async def _publish(self, rec: NodeRecord, why: str) -> None:
        lease = self.lease_id or 0
        # Only while the record is ours: one taken over under another lease is not written over.
        done = await self.etcd.txn(
            [Compare.lease(self.key, "==", lease)], [Op.put(self.key, self._encode(rec), lease=lease)]
        )
        if not done.succeeded:
            raise _LeaseLost("the node record is no longer under our lease")
        self._published_now(rec, why)

    def _encode(self, rec: NodeRecord) -> bytes:
        return encode(msgspec.structs.replace(rec, agent_id=self.identity))

    def _published_now(self, rec: NodeRecord, why: str) -> None:
        self.writes += 1
        self._published, self._published_at = rec, time.monotonic()
        log.debug("node record published", reason=why, writes=self.writes)

    def _published_at_loop(self) -> float:
        # time.monotonic and the loop clock may differ; convert the publish time to loop time.
        loop = asyncio.get_running_loop()
        return loop.time() - (time.monotonic() - self._published_at)

    def _set_state(self, state: str, **kw: object) -> None:
        if state != self.state:
            level = log.warning if state in ("unreachable", "keepalive failing", "re-registering") else log.info
            level("etcd membership " + state, previous=self.state, key=self.key, **kw)
            self.state = state


class MembershipCollector(Collector):
    """``gpu_agent_cluster_*``: registration state, for alerts on a duplicate node_id."""

    def __init__(self, publisher: Callable[[], ClusterPublisher | None]) -> None:
        self.publisher = publisher  # read at scrape time: the publisher starts after the API

    def collect(self) -> Iterator[Metric]:
        p = self.publisher()
        if p is None:
            return
        registered = GaugeMetricFamily("gpu_agent_cluster_registered", "1 while the node record is ours in etcd.")
        registered.add_metric([], 1.0 if p.state in ("registered", "keepalive failing") else 0.0)
        refused = GaugeMetricFamily(
            "gpu_agent_cluster_registration_refused",
            "1 while another agent holds this node_id (duplicate node_id): not registered.",
        )
        refused.add_metric([], 1.0 if p.refused_by is not None else 0.0)
        refusals = CounterMetricFamily(
            "gpu_agent_cluster_registration_refusals", "Registrations refused because another agent held this node_id."
        )
        refusals.add_metric([], float(p.refusals))
        yield from (registered, refused, refusals)
