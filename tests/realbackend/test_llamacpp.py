"""gpu-agent driving a real llama.cpp ``llama-server`` (CPU build, tiny random-weight model).

One agent runs several instances of the real server, each set up to show one thing: a chat
instance with the defaults, an embeddings instance, one that requires an API key, one on a CPU
quota, one with a small shared KV cache, and a ``command`` instance of a server without
``/health``. Clients are the official ``openai`` SDK through the agent's proxy. Each mismatch
found between our backend and the real server has a regression test here.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from helpers import AgentProcess, agent_toml, free_port, start_agent_sync, wait_until

from agent.backends import Upstream, get_backend
from agent.backends.llamacpp import DEFAULT_CONTEXT, LOAD_METRICS
from agent.config import InstanceConfig

pytestmark = pytest.mark.timeout(180)

API_KEY = "sk-llama-test-0123456789"


def llama(name: str, binary: str, model: Path, extra: str = "") -> str:
    return f"""
[[instances]]
name = "{name}"
backend = "llamacpp"
launcher = ["{binary}"]
model = "{model}"
served_model_name = "{name}"
{extra}
"""


@pytest.fixture(scope="module")
def agent_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("llama-agent")


@pytest.fixture(scope="module")
def site(agent_dir: Path) -> Path:
    """A directory served by Python's http.server: an "OpenAI server" with /v1/models only."""
    root = agent_dir / "site"
    (root / "v1").mkdir(parents=True)
    (root / "v1" / "models").write_text(json.dumps({"object": "list", "data": [{"id": "static"}]}))
    return root


@pytest.fixture(scope="module")
def agent_proc(agent_dir: Path, llama_server: str, tiny_model: Path, site: Path) -> Iterator[AgentProcess]:
    key_file = agent_dir / "llama-key"
    key_file.write_text(f"# the key of instance 'keyed'\n{API_KEY}\n")
    key_file.chmod(0o600)
    port = free_port()
    instances = (
        llama("chat", llama_server, tiny_model)
        + llama("victim", llama_server, tiny_model)
        + llama(
            "embed",
            llama_server,
            tiny_model,
            'args = ["--embeddings", "--pooling", "mean"]\nwarmup = { kind = "embedding" }',
        )
        + llama("keyed", llama_server, tiny_model, f'api_key_file = "{key_file}"')
        + llama("quota", llama_server, tiny_model, "cpu_quota = 1.0")
        + llama("small", llama_server, tiny_model, "context_size = 512\nparallel = 4")
        + f"""
[[instances]]
name = "nohealth"
backend = "command"
command = ["{{python}}", "-m", "http.server", "--bind", "127.0.0.1", "--directory", "{site}", "{{port}}"]
served_model_name = "static"
warmup = {{ enabled = false }}
"""
    )
    proc = start_agent_sync(agent_dir, agent_toml(agent_dir, port, instances), port, ready_instances=7, timeout=90)
    yield proc
    proc.stop()


@pytest.fixture
async def agent(agent_proc: AgentProcess) -> AsyncIterator[AgentProcess]:
    """The module's agent with an HTTP client of this test's event loop."""
    agent_proc.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
    try:
        yield agent_proc
    finally:
        await agent_proc.http.close()
        agent_proc.http = None


@pytest.fixture
async def oai(agent: AgentProcess) -> AsyncIterator[openai.AsyncOpenAI]:
    """The official client, as users point it at the agent; no retries of its own."""
    async with openai.AsyncOpenAI(base_url=agent.base + "/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


async def test_openai_sdk_models_chat_stream_embeddings(agent: AgentProcess, oai: openai.AsyncOpenAI) -> None:
    models = {m.id for m in (await oai.models.list()).data}
    assert {"chat", "embed", "keyed", "small"} <= models
    chat = await oai.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "hello"}], max_tokens=8
    )
    assert chat.choices[0].finish_reason in ("length", "stop") and chat.usage and chat.usage.completion_tokens >= 1
    chunks = []
    stream = await oai.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "hello"}], max_tokens=8, stream=True
    )
    async for chunk in stream:
        chunks.append(chunk)
    assert len(chunks) >= 2 and chunks[-1].choices[0].finish_reason in ("length", "stop")
    emb = await oai.embeddings.create(model="embed", input=["the gpu fleet", "hello"])
    assert len(emb.data) == 2 and len(emb.data[0].embedding) == 64


async def test_load_is_read_from_the_real_metrics(agent: AgentProcess, llama_server: str) -> None:
    # Mismatch 1: every metric name the backend reads exists in the real server's /metrics.
    inst = await agent.instance("chat")
    assert agent.http is not None
    async with agent.http.get(f"http://127.0.0.1:{inst['port']}/metrics") as r:
        text = await r.text()
    exported = {line.split()[0] for line in text.splitlines() if line and not line.startswith("#")}
    assert set(LOAD_METRICS.values()) <= exported, set(LOAD_METRICS.values()) - exported
    # The load is read at each probe: the sample before this test's first may still show the
    # last test's request (the server releases its slot after the last event is sent). Wait for
    # one taken with nothing running, exactly 0 and 0 as the real server reports them.
    await wait_until(lambda: _idle(agent, "chat"), timeout=10, what="an idle load read from the real metrics")


async def _load_of(agent: AgentProcess, name: str) -> dict[str, Any] | None:
    return (await agent.instance(name)).get("load")


async def _idle(agent: AgentProcess, name: str) -> bool:
    load = await _load_of(agent, name)
    return load is not None and load["requests_running"] == 0.0 and load["requests_waiting"] == 0.0


async def test_context_is_bounded_when_not_configured(agent: AgentProcess) -> None:
    # Mismatch 2: the model declares 1M tokens; llama-server would size its KV cache for all of
    # them. The agent passes a context size, and the server's own /props says it took it.
    chat = await agent.instance("chat")
    small = await agent.instance("small")
    assert agent.http is not None
    for inst, want_ctx, want_slots in ((chat, DEFAULT_CONTEXT, 4), (small, 512, 4)):
        async with agent.http.get(f"http://127.0.0.1:{inst['port']}/props") as r:
            props = await r.json()
        assert props["total_slots"] == want_slots
        # With a unified KV cache every slot may use the whole context.
        assert props["default_generation_settings"]["n_ctx"] == want_ctx
    rss_kb = int(Path(f"/proc/{chat['pid']}/status").read_text().split("VmRSS:")[1].split()[0])
    assert rss_kb < 200_000, f"{rss_kb} kB: the KV cache was not bounded"


async def test_full_kv_cache_is_not_an_instance_failure(agent: AgentProcess, oai: openai.AsyncOpenAI) -> None:
    # Mismatch 3: concurrent long generations fill the small instance's shared KV cache and
    # llama-server answers 500 "Context size has been exceeded." to some. That is a full
    # instance, not a failing one: the client gets 429 (or its answer), and the instance is
    # neither probed out nor counted as failing.
    before = await _proxy_counters(agent)
    prompt = "hello world " * 8  # ~100 tokens: one request fits 512, eight at once do not

    async def one() -> int:
        try:
            await oai.completions.create(model="small", prompt=prompt, max_tokens=300, extra_body={"ignore_eos": True})
            return 200
        except openai.APIStatusError as e:
            assert e.status_code == 429 and e.body and e.body.get("code") == "context_capacity_exceeded", e
            return e.status_code

    codes = await asyncio.gather(*(one() for _ in range(8)))
    assert 429 in codes, codes  # the shared cache really filled up (else this tests nothing)
    small = await agent.instance("small")
    assert small["state"] == "READY" and small["restarts"] == 0 and small["errors_total"] == 0
    after = await _proxy_counters(agent)
    assert after["attempt_errors"] == before["attempt_errors"]
    text = await _metrics(agent)
    assert 'gpu_agent_proxy_upstream_errors_total{instance="small",kind="capacity",model="small"}' in text


async def test_client_mistake_is_passed_through_and_counts_nothing(
    agent: AgentProcess, oai: openai.AsyncOpenAI
) -> None:
    # Mismatch 4: embeddings of a chat instance is the client's mistake (llama-server: 501).
    before = await _proxy_counters(agent)
    with pytest.raises(openai.APIStatusError) as err:
        await oai.embeddings.create(model="chat", input="hi")
    assert err.value.status_code == 501 and "embeddings" in str(err.value.body)
    # A prompt longer than any slot: 400 from llama-server, passed on as it is.
    with pytest.raises(openai.BadRequestError) as bad:
        await oai.completions.create(model="small", prompt="hello world " * 400, max_tokens=4)
    assert "exceeds the available context size" in str(bad.value.body)
    chat = await agent.instance("chat")
    assert chat["errors_total"] == 0 and chat["state"] == "READY"
    after = await _proxy_counters(agent)
    assert after["attempt_errors"] == before["attempt_errors"]
    assert after["attempts"] >= before["attempts"] + 2


async def test_instance_with_api_key(agent: AgentProcess, oai: openai.AsyncOpenAI) -> None:
    # Mismatch 5: the server requires a key; probes, warm-up, metrics and proxied requests
    # carry it, and the key is not on the server's command line.
    keyed = await agent.instance("keyed")
    assert keyed["state"] == "READY" and keyed["restarts"] == 0
    assert API_KEY.encode() not in Path(f"/proc/{keyed['pid']}/cmdline").read_bytes()
    base = f"http://127.0.0.1:{keyed['port']}"
    assert agent.http is not None
    async with agent.http.get(base + "/metrics") as r:
        assert r.status == 401  # the server really requires it
    loaded = await wait_until(lambda: _load_of(agent, "keyed"), timeout=10, what="load read with the key")
    assert loaded["requests_running"] is not None
    chat = await oai.chat.completions.create(model="keyed", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert chat.choices


async def test_threads_follow_the_cpu_quota(agent: AgentProcess, agent_dir: Path) -> None:
    # Mismatch 8: one thread per core of the quota, not one per core of the host.
    quota = await agent.instance("quota")
    cmdline = Path(f"/proc/{quota['pid']}/cmdline").read_bytes().split(b"\0")
    assert cmdline[cmdline.index(b"-t") + 1] == b"1" and cmdline[cmdline.index(b"-tb") + 1] == b"1"
    log = (agent_dir / "logs" / "quota.log").read_text()
    assert "n_threads = 1" in log


async def test_command_server_without_health_path(agent: AgentProcess, site: Path) -> None:
    # Mismatch 7: a server with no /health is probed on /v1/models and becomes READY.
    inst = await agent.instance("nohealth")
    assert inst["state"] == "READY"


async def test_health_path_that_does_not_exist_is_reported(tmp_path: Path, site: Path) -> None:
    # Mismatch 7, the other half: a configured path that 404s says so while it waits.
    port = free_port()
    cfg = agent_toml(
        tmp_path,
        port,
        f"""
[[instances]]
name = "wrongpath"
backend = "command"
command = ["{{python}}", "-m", "http.server", "--bind", "127.0.0.1", "--directory", "{site}", "{{port}}"]
served_model_name = "static"
health_path = "/healthz"
warmup = {{ enabled = false }}
""",
    )
    async with AgentProcess(tmp_path, cfg, port) as a:

        async def reported() -> str | None:
            err = (await a.instance("wrongpath")).get("last_error") or ""
            return err if "404" in err else None

        err = await wait_until(reported, timeout=20, what="404 reported")
        assert "/healthz" in err and "health_path" in err
        assert (await a.instance("wrongpath"))["state"] == "STARTING"


async def test_start_failure_reports_the_servers_own_message(
    tmp_path: Path, llama_server: str, tiny_model: Path
) -> None:
    # Mismatch 6: the first failure's last_error quotes llama-server, not the agent's marker.
    port = free_port()
    missing = tmp_path / "no-such-model.gguf"
    cfg = agent_toml(tmp_path, port, llama("broken", llama_server, missing))
    async with AgentProcess(tmp_path, cfg, port) as a:

        async def failed_once() -> str | None:
            inst = await a.instance("broken")
            return inst.get("last_error") if inst.get("restarts", 0) >= 1 or inst.get("state") == "FAILED" else None

        err = await wait_until(failed_once, timeout=30, what="first start failure")
        assert "exited during start-up" in err and "gpu-agent:" not in err
        assert "no-such-model.gguf" in err or "failed to load" in err, err


async def test_readiness_loading_then_ready(llama_server: str, tiny_model: Path, tmp_path: Path) -> None:
    # The backend's own probe against the real server: 503 "Loading model" first, then 200.
    # A large context makes the loading phase long enough to see (KV cache allocation).
    backend = get_backend("llamacpp")
    port = free_port()
    cfg = InstanceConfig(name="r", backend="llamacpp", model=str(tiny_model), context_size=262144)
    spec = backend.launch(cfg, port)
    proc = await asyncio.create_subprocess_exec(
        llama_server, *spec.argv[1:], stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    seen: list[str] = []
    try:
        async with aiohttp.ClientSession() as http:
            up = Upstream(f"http://127.0.0.1:{port}")
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                r = await backend.probe(http, up, cfg, 2)
                state = "ready" if r.ok else "loading" if r.loading else "down"
                if not seen or seen[-1] != state:
                    seen.append(state)
                if r.ok:
                    break
                await asyncio.sleep(0.002)
    finally:
        proc.terminate()
        await proc.wait()
    assert seen[-1] == "ready" and "loading" in seen, seen


async def test_sigkill_of_the_server_is_recovered(agent: AgentProcess, oai: openai.AsyncOpenAI) -> None:
    before = await agent.instance("victim")
    os.kill(before["pid"], signal.SIGKILL)
    after = await agent.wait_state("victim", "READY", timeout=60, restarts=before["restarts"] + 1)
    assert after["pid"] != before["pid"]
    assert "SIGKILL" in (after["last_error"] or "")
    chat = await oai.chat.completions.create(
        model="victim", messages=[{"role": "user", "content": "again"}], max_tokens=4
    )
    assert chat.choices


async def _proxy_counters(agent: AgentProcess) -> dict[str, Any]:
    return (await agent.status())["proxy"]


async def _metrics(agent: AgentProcess) -> str:
    assert agent.http is not None
    async with agent.http.get(agent.base + "/metrics") as r:
        return await r.text()
