"""The demo's own requests: a few chat completions sent through one agent's proxy, and where each
one went.

Where a request went is read from the entry agent's access log, the record the proxy keeps anyway:
each request is sent with its own ``X-Request-ID``, and the proxy's ``request`` line for that ID
names the instance that answered (``instance``: a local instance by name, another node's as
``node/instance``) and how many retries it took.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpufleet.facts import REQUEST_ID_HEADER

from .fleetbase import FleetError, wait_for
from .localfleet import get_json


@dataclass
class Answer:
    model: str
    status: int
    seconds: float
    text: str
    node: str = "?"  # who answered: the node ...
    instance: str = "?"  # ... and its instance
    retries: int = 0


def reachable_models(agent_base: str) -> set[str]:
    """The models this agent's proxy can serve now: its own READY ones and, in a cluster, those
    another node serves READY with a weight (its ``/v1/models``)."""
    try:
        return {m["id"] for m in get_json(agent_base + "/v1/models")["data"]}
    except (OSError, ValueError, KeyError):
        return set()


def chat(agent_base: str, model: str, prompt: str, timeout: float = 30.0) -> tuple[str, int, float, str]:
    """One chat completion through the proxy: (request ID, HTTP status, seconds, answer or error)."""
    rid = "demo-" + uuid.uuid4().hex[:12]
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 6}
    req = urllib.request.Request(
        agent_base + "/v1/chat/completions",
        json.dumps(body).encode(),
        {"Content-Type": "application/json", REQUEST_ID_HEADER: rid},
    )
    t0 = time.monotonic()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            doc = json.loads(r.read())
            return rid, r.status, time.monotonic() - t0, doc["choices"][0]["message"]["content"].strip()
    except urllib.error.HTTPError as e:
        return rid, e.code, time.monotonic() - t0, e.read()[:200].decode(errors="replace")
    except (OSError, ValueError, KeyError, IndexError) as e:
        return rid, 0, time.monotonic() - t0, str(e)


def access_record(log: Path, rid: str) -> dict[str, Any] | None:
    """The proxy's access-log line for request ``rid`` in an agent's JSON log, if written yet."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        if rid in line:
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if doc.get("event") == "request" and doc.get("request_id") == rid:
                return doc
    return None


def send_chats(agent_base: str, node: str, log: Path, models: list[str]) -> list[Answer]:
    """Send one chat request per entry of ``models`` through the agent at ``agent_base`` (node
    ``node``, its log in ``log``), one after the other; each answer with who gave it."""
    answers = []
    for i, model in enumerate(models, 1):
        rid, status, seconds, text = chat(agent_base, model, f"demo request {i}: say hello")
        answer = Answer(model, status, seconds, text)
        # The access line is written as the response completes: give it a moment to land.
        record = _within(5.0, lambda r=rid: access_record(log, r))
        if record is not None:
            where = record.get("instance") or "?"  # "node/instance" when another node answered
            answer.node, _, answer.instance = where.rpartition("/") if "/" in where else (node, "", where)
            answer.retries = int(record.get("retries") or 0)
        answers.append(answer)
    return answers


def _within(timeout: float, cond: Any) -> Any:
    """``cond()`` once it is truthy, None if it is not within ``timeout``."""
    try:
        return wait_for(cond, timeout, "the access log line")
    except FleetError:
        return None


def format_answers(answers: list[Answer], entry: str) -> str:
    lines = []
    for a in answers:
        hop = "answered locally" if a.node == entry else f"forwarded by {entry}"
        retries = f", {a.retries} retr{'y' if a.retries == 1 else 'ies'}" if a.retries else ""
        if a.status == 200:
            lines.append(
                f"  {a.model:<15} -> {a.node} / {a.instance}  ({hop}{retries}, {a.seconds * 1000:.0f} ms): {a.text!r}"
            )
        else:
            lines.append(f"  {a.model:<15} -> HTTP {a.status or 'error'}: {a.text}")
    return "\n".join(lines)
