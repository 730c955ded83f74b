"""Exact usage through a kill -9 (issue 16, item 4): real etcd, two coordinators, agent ``a``
serving model ``m`` and entry agent ``b`` (keys mode, hop secret) forwarding to it; clients on
the official ``openai`` SDK send chat requests through ``b`` — plain, streamed with
``include_usage``, and streamed without it (the usage is then asked for and hidden by ``b``).

``b`` is killed with SIGKILL in the middle of the traffic and started again, and the leading
coordinator is killed before more traffic (usage does not go through the coordinators). The rule
(docs/architecture.md, API keys): every answer a client received whole is billed exactly once;
a request cut by the kill is billed at most once — it is billed if ``b`` had journalled it,
which happens just before the client gets the end of its answer. The simulated server's usage
is a function of the request (prompt words, ``max_tokens``: checked on every answer), so the
test knows what each cut request would have cost and checks that ``gpuctl usage -o json`` is
the received answers' usage plus the usage of some subset of the cut requests (every request
has a usage of its own: a received answer missing or counted twice would have to be offset
exactly, in requests, prompt and completion tokens, by cut ones)."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
from etcd_fixtures import EtcdCluster
from helpers import (
    AgentProcess,
    CoordinatorProcess,
    agent_toml,
    free_port,
    instance_toml,
    start_agent_sync,
    wait_until,
)
from keyfleet import KeyFleet

from gpufleet.tomlwrite import dumps as toml_dumps

CLUSTER = "usage-e2e"
CLIENTS = 6


@dataclass
class Sent:
    words: int  # the prompt's words: the simulated server's prompt_tokens
    max_tokens: int  # its completion_tokens
    kind: str  # "plain", "stream" (include_usage) or "hidden" (a stream the agent asks usage for)
    ok: bool
    failure: Exception | None = None

    @property
    def error(self) -> str:
        return repr(self.failure)


def gpuctl(etcd: EtcdCluster, *args: str) -> subprocess.CompletedProcess[str]:
    return KeyFleet.gpuctl_on(etcd, CLUSTER, *args)


def local_gpuctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gpuctl", *args], capture_output=True, text=True, timeout=60)


def fleet_usage(etcd: EtcdCluster, *args: str) -> dict[str, Any]:
    out = gpuctl(etcd, "usage", *args, "-o", "json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def one_request(client: openai.OpenAI, words: int, max_tokens: int, kind: str) -> None:
    """Send one request; raise unless the answer came whole with the usage the server reports."""
    messages: Any = [{"role": "user", "content": " ".join(["token"] * words)}]
    if kind == "plain":
        reply = client.chat.completions.create(model="m", messages=messages, max_tokens=max_tokens)
        assert reply.usage is not None
        assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (words, max_tokens)
        return
    extra: Any = {"stream_options": {"include_usage": True}} if kind == "stream" else {}
    chunks = list(
        client.chat.completions.create(model="m", messages=messages, max_tokens=max_tokens, stream=True, **extra)
    )
    reported = [c.usage for c in chunks if c.usage is not None]
    if kind == "stream":
        assert len(reported) == 1
        assert (reported[0].prompt_tokens, reported[0].completion_tokens) == (words, max_tokens)
    else:
        assert reported == []  # asked for by the agent, hidden from the client
    assert sum(len(c.choices[0].delta.content or "") > 0 for c in chunks if c.choices) == max_tokens


class Traffic:
    """CLIENTS threads sending requests until stopped; each request's shape is unique, so its
    usage names it."""

    def __init__(self, base: str, secret: str, start: int) -> None:
        self.client = openai.OpenAI(base_url=base + "/v1", api_key=secret, max_retries=0, timeout=30)
        self.sent: list[Sent] = []
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._shapes = itertools.count(start)
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(CLIENTS)]
        for t in self._threads:
            t.start()

    def _shape(self) -> tuple[int, int, str]:
        with self._lock:
            n = next(self._shapes)
        # Distinct (words, max_tokens) per request: words = n, and max_tokens from n too.
        return n, 4 + (n * 7) % 29, ("plain", "stream", "hidden")[n % 3]

    def _run(self) -> None:
        while not self.stop.is_set():
            words, max_tokens, kind = self._shape()
            try:
                one_request(self.client, words, max_tokens, kind)
                sent = Sent(words, max_tokens, kind, ok=True)
            except Exception as e:  # cut by the kill (connection errors), or a wrong answer: asserted on
                sent = Sent(words, max_tokens, kind, ok=False, failure=e)
            with self._lock:
                self.sent.append(sent)

    def ok(self) -> int:
        with self._lock:
            return sum(s.ok for s in self.sent)

    def end(self) -> list[Sent]:
        self.stop.set()
        for t in self._threads:
            t.join(60)
        return self.sent


def totals(sent: list[Sent]) -> tuple[int, int, int]:
    return len(sent), sum(s.words for s in sent), sum(s.max_tokens for s in sent)


def billed_cut_subset(billed: tuple[int, int, int], received: tuple[int, int, int], cut: list[Sent]) -> list[Sent]:
    """The cut requests whose usage, added to what was received, is exactly what was billed."""
    for r in range(len(cut) + 1):
        for subset in itertools.combinations(cut, r):
            extra = totals(list(subset))
            if tuple(a + b for a, b in zip(received, extra, strict=True)) == billed:
                return list(subset)
    raise AssertionError(f"billed {billed} is not received {received} plus any subset of the cut requests {cut}")


def billed_of(report: dict[str, Any]) -> tuple[int, int, int]:
    t = report["total"]
    assert t["total_tokens"] == t["prompt_tokens"] + t["completion_tokens"]
    return t["requests"], t["prompt_tokens"], t["completion_tokens"]


async def test_usage_is_exact_through_a_kill_of_the_entry_agent(etcd: EtcdCluster, tmp_path: Path) -> None:
    fleet = KeyFleet(etcd, tmp_path, CLUSTER)
    secret = fleet.create_key("team", "--models", "m")
    a = fleet.agent("a", "m")
    b = fleet.agent("b", "other")
    coordinators = [CoordinatorProcess(tmp_path, c, etcd.endpoints, CLUSTER).start() for c in ("c1", "c2")]
    try:
        for c in coordinators:
            c.wait_ready_sync()
        # A key of its own for the probes: those answered 503 before the route was known are
        # billed too (as errors), to it, not to the key the test sums.
        created = gpuctl(etcd, "keys", "create", "probe", "--models", "m", "-o", "json")
        assert created.returncode == 0, created.stderr
        probe = openai.OpenAI(base_url=b.base + "/v1", api_key=json.loads(created.stdout)["secret"], max_retries=0)

        def forwards() -> bool:
            try:
                one_request(probe, 2, 1, "plain")
                return True
            except openai.APIError:
                return False

        await wait_until(forwards, 30, what="b forwards to a")
        team = openai.OpenAI(base_url=b.base + "/v1", api_key=secret, max_retries=0, timeout=10)

        # Phase 1: traffic through b, and b killed in the middle of it.
        traffic = Traffic(b.base, secret, start=10)
        await wait_until(lambda: traffic.ok() >= 40, 60, what="40 answers through b")
        traffic.stop.set()  # no new requests; those in flight are cut by the kill
        b.kill()
        phase1 = traffic.end()
        received = [s for s in phase1 if s.ok]
        cut = [s for s in phase1 if not s.ok]
        assert 1 <= len(cut) <= CLIENTS, [s.error for s in cut]
        assert not [s.error for s in cut if isinstance(s.failure, openai.APIStatusError)]  # cut, not refused

        # Restarted, b replays its journal and rolls it into etcd: everything received, once.
        # Rolled up = the segments it replayed are gone (only the one being written is left).
        b.start()
        b.wait_ready_sync(1)
        journal = tmp_path / "b" / "state" / "usage"
        await wait_until(lambda: len(list(journal.glob("seg-*"))) == 1, 30, what="b's replayed journal rolled up")
        report = fleet_usage(etcd, "team")
        billed1 = billed_of(report)
        billed_cut = billed_cut_subset(billed1, totals(received), cut)
        assert report["nodes"] == ["b"]  # counted at the entry node only, not again at a
        assert report["total"]["errors"] == 0
        assert [(u["key"], u["model"]) for u in report["usage"]] == [("team", "m")]

        # A leader change: usage does not go through the coordinators, so it changes nothing.
        await wait_until(lambda: any(c.is_leader() for c in coordinators), 30, what="a leader")
        leader = next(c for c in coordinators if c.is_leader())
        leader.kill()
        other = next(c for c in coordinators if c is not leader)
        await wait_until(other.is_leader, 30, what="the other coordinator leads")

        # Phase 2: the restarted b bills on, on top of what it replayed.
        await wait_until(forwards, 30, what="the restarted b forwards")
        traffic = Traffic(b.base, secret, start=1_000)
        await wait_until(lambda: traffic.ok() >= 20, 60, what="20 answers through the restarted b")
        phase2 = traffic.end()
        assert all(s.ok for s in phase2), [s.error for s in phase2 if not s.ok]
        expected = tuple(x + y for x, y in zip(billed1, totals(phase2), strict=True))
        await wait_until(lambda: billed_of(fleet_usage(etcd, "team")) == expected, 30, what="phase 2 rolled up")
        assert billed_of(fleet_usage(etcd, "team", "--since", "2h", "--model", "m")) == expected

        # A clean restart rolls up the rest at the stop and replays nothing twice.
        b.stop()
        b.start()
        b.wait_ready_sync(1)
        await wait_until(forwards, 30, what="the restarted b forwards")
        one_request(team, 3, 2, "plain")
        final = tuple(x + y for x, y in zip(expected, (1, 3, 2), strict=True))
        await wait_until(lambda: billed_of(fleet_usage(etcd, "team")) == final, 30, what="the last request rolled up")
        print(f"received {len(received)} + {len(phase2)}, cut {len(cut)} of which billed {len(billed_cut)}")
    finally:
        for c in coordinators:
            c.stop()
        a.stop()
        b.stop()


async def test_a_standalone_agents_usage_survives_a_kill(tmp_path: Path) -> None:
    """A standalone agent (keys file) killed mid-traffic: its journal, replayed and rolled into
    ``usage/rolled.json``, and ``gpuctl usage --state-dir`` (record + journal) bill by the same
    rule."""
    keys_file = tmp_path / "keys.json"
    created = local_gpuctl("keys", "create", "team", "--file", str(keys_file), "-o", "json")
    assert created.returncode == 0, created.stderr
    secret = json.loads(created.stdout)["secret"]
    port = free_port()
    text = agent_toml(tmp_path, port, instance_toml("m-0", model="m", gpus="[0]", fraction=0.5))
    text += "\n" + toml_dumps({"auth": {"mode": "keys", "keys_file": keys_file}})
    agent = start_agent_sync(tmp_path, text, port, ready_instances=1)
    state = tmp_path / "state"

    def local_usage() -> tuple[int, int, int]:
        out = local_gpuctl("usage", "--state-dir", str(state), "-o", "json")
        assert out.returncode == 0, out.stderr
        return billed_of(json.loads(out.stdout))

    try:
        traffic = Traffic(agent.base, secret, start=10)
        await wait_until(lambda: traffic.ok() >= 30, 60, what="30 answers")
        traffic.stop.set()
        agent.kill()
        sent = traffic.end()
        received = [s for s in sent if s.ok]
        cut = [s for s in sent if not s.ok]
        assert not [s.error for s in cut if isinstance(s.failure, openai.APIStatusError)]
        billed_cut_subset(local_usage(), totals(received), cut)  # read from the files of the dead agent

        agent.start()
        agent.wait_ready_sync(1)
        journal = state / "usage"
        await wait_until(lambda: len(list(journal.glob("seg-*"))) == 1, 30, what="the journal rolled up")
        billed = local_usage()
        billed_cut_subset(billed, totals(received), cut)
        agent.stop()  # a clean stop rolls up the rest; the record alone then holds everything
        assert len(list(journal.glob("seg-*"))) == 1 and local_usage() == billed
    finally:
        agent.stop()


def test_an_agent_that_needs_keys_does_not_start_without_its_usage_journal(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.json"
    assert local_gpuctl("keys", "create", "team", "--file", str(keys_file)).returncode == 0
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "usage").write_text("not a directory\n")
    port = free_port()
    text = agent_toml(tmp_path, port, instance_toml("m-0", model="m"))
    text += "\n" + toml_dumps({"auth": {"mode": "keys", "keys_file": keys_file}})
    agent = AgentProcess(tmp_path, text, port)
    agent.start()
    assert agent.proc is not None and agent.proc.wait(60) == 78
    assert f"cannot keep the usage journal in {tmp_path / 'state' / 'usage'}" in agent.log_tail()
