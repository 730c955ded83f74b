"""The agent runs Python's cyclic garbage collector's full collections less often than CPython's
default (agent/daemon.py, FULL_COLLECTION_EVERY): with thousands of open streams each full
collection stalled every one of them (docs/benchmarks.md, issue 18 step 10). An agent in this
process: its start sets the threshold, its stop puts the process's thresholds back."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path

import aiohttp
from helpers import agent_toml, free_port, wait_until

from agent.config import load_config
from agent.daemon import FULL_COLLECTION_EVERY, AgentRuntime


async def test_full_collections_run_less_often_while_the_agent_runs(tmp_path: Path) -> None:
    before = gc.get_threshold()
    assert before[2] != FULL_COLLECTION_EVERY, "the test process must start from another value"
    port = free_port()
    config = tmp_path / "agent.toml"
    config.write_text(agent_toml(tmp_path, port, ""))
    rt = AgentRuntime(load_config(config))
    run = asyncio.create_task(rt.run())
    try:
        async with aiohttp.ClientSession() as http:

            async def alive() -> bool:
                try:
                    async with http.get(f"http://127.0.0.1:{port}/healthz") as r:
                        return r.status == 200
                except aiohttp.ClientConnectionError:
                    return False

            await wait_until(alive, timeout=30, what="the agent's /healthz")
        # The younger generations keep their thresholds: a request's own cycles die there.
        assert gc.get_threshold() == (before[0], before[1], FULL_COLLECTION_EVERY)
    finally:
        rt.request_stop()
        assert await asyncio.wait_for(run, 30) == 0
    assert gc.get_threshold() == before
