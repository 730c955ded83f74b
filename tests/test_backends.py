"""Backends: argv/env per server kind, and how each tells loading from ready and reads load.

The probes run against small aiohttp servers that answer the way each real server does. The
llama.cpp backend is also tested against a real llama-server (tests/realbackend/), the vLLM
backend end to end against the simulated vLLM server (test_agent_supervision.py).
"""

from __future__ import annotations

import sys

import aiohttp
import msgspec
import pytest
from aiohttp import web

from agent.backends import Upstream, get_backend
from agent.backends.prometheus_text import parse_samples
from agent.config import InstanceConfig, Warmup


def inst(**kw: object) -> InstanceConfig:
    base: dict = {"name": "i", "backend": "vllm", "model": "/m/qwen"}
    base.update(kw)
    return msgspec.convert(base, InstanceConfig)


def test_vllm_argv() -> None:
    spec = get_backend("vllm").launch(
        inst(gpus=[0], gpu_memory_fraction=0.4, served_model_name="qwen", args=["--x"]), 8001
    )
    assert spec.argv == [
        "vllm",
        "serve",
        "/m/qwen",
        "--host",
        "127.0.0.1",
        "--port",
        "8001",
        "--served-model-name",
        "qwen",
        "--gpu-memory-utilization",
        "0.4",
        "--x",
    ]
    tp = get_backend("vllm").launch(inst(gpus=[0, 1], gpu_memory_fraction=0.9), 1)
    assert tp.argv[-2:] == ["--tensor-parallel-size", "2"]


def test_launcher_replaces_executable_and_python_placeholder() -> None:
    spec = get_backend("vllm").launch(inst(launcher=["{python}", "-m", "x"]), 1)
    assert spec.argv[:3] == [sys.executable, "-m", "x"]


def test_llamacpp_argv_gpu_and_cpu() -> None:
    b = get_backend("llamacpp")
    gpu = b.launch(
        inst(backend="llamacpp", model="/m/q.gguf", gpus=[1], gpu_memory_fraction=0.5, served_model_name="q"), 9
    )
    assert gpu.argv == [
        "llama-server",
        "-m",
        "/m/q.gguf",
        "--host",
        "127.0.0.1",
        "--port",
        "9",
        "-ngl",
        "999",
        "--alias",
        "q",
        "--metrics",
        "-c",
        "8192",
    ]
    cpu = b.launch(inst(backend="llamacpp", model="/m/q.gguf"), 9)
    assert cpu.argv[cpu.argv.index("-ngl") + 1] == "0"
    some = b.launch(inst(backend="llamacpp", model="/m/q.gguf", gpus=[0], gpu_memory_fraction=0.5, gpu_layers=20), 9)
    assert some.argv[some.argv.index("-ngl") + 1] == "20"


def test_koboldcpp_argv_gpu_and_cpu() -> None:
    b = get_backend("koboldcpp")
    gpu = b.launch(inst(backend="koboldcpp", model="/m/k.gguf", gpus=[0], gpu_memory_fraction=0.5, gpu_layers=35), 5001)
    assert gpu.argv == [
        "koboldcpp",
        "--model",
        "/m/k.gguf",
        "--host",
        "127.0.0.1",
        "--port",
        "5001",
        "--usecublas",
        "--gpulayers",
        "35",
    ]
    cpu = b.launch(inst(backend="koboldcpp", model="/m/k.gguf"), 5002)
    assert "--usecublas" not in cpu.argv and cpu.argv[-2:] == ["--gpulayers", "0"]


def test_ollama_env() -> None:
    spec = get_backend("ollama").launch(inst(backend="ollama", model="qwen3:32b", port=11500), 11500)
    assert spec.argv == ["ollama", "serve"]
    assert spec.env == {"OLLAMA_HOST": "127.0.0.1:11500", "OLLAMA_KEEP_ALIVE": "-1"}


def test_command_placeholders_keep_json_braces() -> None:
    spec = get_backend("command").launch(
        inst(
            backend="command", model="m", command=["srv", "--port={port}", "--cfg", '{"a": 1}', "{served_model_name}"]
        ),
        7000,
    )
    assert spec.argv == ["srv", "--port=7000", "--cfg", '{"a": 1}', "m"]


def test_prometheus_parser() -> None:
    text = """# HELP vllm:num_requests_running x
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="a"} 2.0
vllm:num_requests_running{model_name="b",x="}"} 3
vllm:num_requests_waiting 1e1
garbage line
vllm:kv_cache_usage_perc{model_name="a"} NaNx
"""
    got = parse_samples(text, {"vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"})
    assert got == {"vllm:num_requests_running": 5.0, "vllm:num_requests_waiting": 10.0}


async def serve(aiohttp_server, routes: dict[str, object]) -> Upstream:  # type: ignore[no-untyped-def]
    app = web.Application()
    for path, handler in routes.items():
        app.router.add_route("*", path, handler)  # type: ignore[arg-type]
    server = await aiohttp_server(app)
    return Upstream(str(server.make_url("")).rstrip("/"))


async def test_llamacpp_loading_then_ready_and_load(aiohttp_server) -> None:  # type: ignore[no-untyped-def]
    state = {"loading": True}

    async def health(_: web.Request) -> web.Response:
        if state["loading"]:
            return web.json_response({"error": {"code": 503, "message": "Loading model"}}, status=503)
        return web.json_response({"status": "ok"})

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(text="llamacpp:requests_processing 2\nllamacpp:requests_deferred 1\n")

    url = await serve(aiohttp_server, {"/health": health, "/metrics": metrics})
    b, cfg = get_backend("llamacpp"), inst(backend="llamacpp")
    async with aiohttp.ClientSession() as http:
        r = await b.probe(http, url, cfg, 2)
        assert not r.ok and r.loading
        state["loading"] = False
        assert (await b.probe(http, url, cfg, 2)).ok
        load = await b.read_load(http, url, cfg, 2)
        assert load is not None and (load.requests_running, load.requests_waiting) == (2.0, 1.0)


async def test_vllm_health_ok_but_model_not_listed(aiohttp_server) -> None:  # type: ignore[no-untyped-def]
    async def health(_: web.Request) -> web.Response:
        return web.Response()

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "other"}]})

    url = await serve(aiohttp_server, {"/health": health, "/v1/models": models})
    async with aiohttp.ClientSession() as http:
        r = await get_backend("vllm").probe(http, url, inst(served_model_name="qwen"), 2)
    assert not r.ok and "does not list 'qwen'" in r.detail


async def test_ollama_ready_only_when_model_pulled(aiohttp_server) -> None:  # type: ignore[no-untyped-def]
    tags = {"models": [{"name": "llama3:latest"}]}

    async def api_tags(_: web.Request) -> web.Response:
        return web.json_response(tags)

    url = await serve(aiohttp_server, {"/api/tags": api_tags})
    b = get_backend("ollama")
    async with aiohttp.ClientSession() as http:
        assert (await b.probe(http, url, inst(backend="ollama", model="llama3"), 2)).ok
        r = await b.probe(http, url, inst(backend="ollama", model="qwen3:32b"), 2)
    assert not r.ok and "ollama pull qwen3:32b" in r.detail


async def test_koboldcpp_probe_and_perf(aiohttp_server) -> None:  # type: ignore[no-untyped-def]
    async def model(_: web.Request) -> web.Response:
        return web.json_response({"result": "koboldcpp/mistral"})

    async def perf(_: web.Request) -> web.Response:
        return web.json_response({"queue": 3, "idle": 0, "last_process": 0.1})

    url = await serve(aiohttp_server, {"/api/v1/model": model, "/api/extra/perf": perf})
    b, cfg = get_backend("koboldcpp"), inst(backend="koboldcpp")
    async with aiohttp.ClientSession() as http:
        assert (await b.probe(http, url, cfg, 2)).ok
        load = await b.read_load(http, url, cfg, 2)
    assert load is not None and (load.requests_running, load.requests_waiting) == (1.0, 3.0)


async def test_probe_of_closed_port_and_timeout(aiohttp_server) -> None:  # type: ignore[no-untyped-def]
    import asyncio

    async def slow(_: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.Response()

    url = await serve(aiohttp_server, {"/health": slow})
    async with aiohttp.ClientSession() as http:
        r = await get_backend("llamacpp").probe(http, url, inst(backend="llamacpp"), 0.2)
        assert not r.ok and "no answer within 0.2s" in r.detail
        r = await get_backend("llamacpp").probe(http, Upstream("http://127.0.0.1:1"), inst(backend="llamacpp"), 1)
        assert not r.ok and "refused" in r.detail.lower()


@pytest.mark.parametrize(
    ("kind", "path", "reply", "ok"),
    [
        ("chat", "/v1/chat/completions", {"choices": [{"message": {"content": "hi"}}]}, True),
        ("completion", "/v1/completions", {"choices": []}, False),
        ("embedding", "/v1/embeddings", {"data": [{"embedding": [0.1]}]}, True),
    ],
)
async def test_warm_up_request_shapes(aiohttp_server, kind: str, path: str, reply: dict, ok: bool) -> None:  # type: ignore[no-untyped-def]
    seen: list[dict] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(await request.json())
        return web.json_response(reply)

    url = await serve(aiohttp_server, {path: handler})
    cfg = inst(served_model_name="qwen", warmup=Warmup(kind=kind, prompt="warm", max_tokens=2))  # type: ignore[arg-type]
    async with aiohttp.ClientSession() as http:
        r = await get_backend("vllm").warm_up(http, url, cfg)
    assert r.ok is ok
    assert seen[0]["model"] == "qwen"


def test_sizing_flags_per_backend() -> None:
    llama = get_backend("llamacpp").launch(inst(backend="llamacpp", model="/m/q.gguf"), 9).argv
    assert llama[llama.index("-c") + 1] == "8192" and "-np" not in llama and "-t" not in llama
    llama = (
        get_backend("llamacpp")
        .launch(inst(backend="llamacpp", model="/m/q.gguf", context_size=2048, parallel=2, cpu_quota=2.5), 9)
        .argv
    )
    assert llama[llama.index("-c") + 1] == "2048" and llama[llama.index("-np") + 1] == "2"
    assert "--kv-unified" in llama and llama[llama.index("-t") + 1] == "2" and llama[llama.index("-tb") + 1] == "2"
    # Flags the operator gave in args win: the agent adds none of its own for them.
    own = (
        get_backend("llamacpp")
        .launch(inst(backend="llamacpp", model="/m/q.gguf", cpu_quota=4, args=["-c", "100", "--threads", "3"]), 9)
        .argv
    )
    assert own.count("-c") == 1 and "-t" not in own
    vllm = get_backend("vllm").launch(inst(context_size=32768, parallel=64), 9).argv
    assert vllm[vllm.index("--max-model-len") + 1] == "32768" and vllm[vllm.index("--max-num-seqs") + 1] == "64"
    kobold = get_backend("koboldcpp").launch(inst(backend="koboldcpp", model="/m/k.gguf", context_size=4096), 9)
    assert kobold.argv[kobold.argv.index("--contextsize") + 1] == "4096"
    ollama = get_backend("ollama").launch(inst(backend="ollama", model="llama3", context_size=8192, parallel=2), 9)
    assert ollama.env["OLLAMA_CONTEXT_LENGTH"] == "8192" and ollama.env["OLLAMA_NUM_PARALLEL"] == "2"


def test_api_key_sources(tmp_path) -> None:  # type: ignore[no-untyped-def]
    key_file = tmp_path / "key"
    key_file.write_text("# comment\n\nsk-one\nsk-two\n")
    b = get_backend("llamacpp")
    from_file = inst(backend="llamacpp", model="/m", api_key_file=str(key_file))
    assert b.api_key(from_file) == "sk-one"
    assert b.key_env(from_file, "sk-one") == {"LLAMA_API_KEY": "sk-one"}
    assert b.api_key(inst(backend="llamacpp", model="/m", args=["--api-key", "a,b"])) == "a"
    assert b.api_key(inst(backend="llamacpp", model="/m", args=[f"--api-key-file={key_file}"])) == "sk-one"
    assert b.api_key(inst(backend="llamacpp", model="/m", env={"LLAMA_API_KEY": "e"})) == "e"
    assert b.key_env(inst(backend="llamacpp", model="/m", env={"LLAMA_API_KEY": "e"}), "e") == {}
    assert get_backend("vllm").api_key(inst(args=["--api-key=v"])) == "v"
    assert b.api_key(inst(backend="llamacpp", model="/m")) is None


@pytest.mark.parametrize(
    ("backend", "status", "body", "verdict", "rewritten", "counted"),
    [
        ("vllm", 200, b"{}", "answer", None, True),
        ("vllm", 400, b'{"error": "too long"}', "answer", None, True),
        ("vllm", 404, b"", "answer", None, True),
        ("vllm", 429, b"", "busy", None, True),
        ("vllm", 500, b"engine dead", "failing", None, True),
        ("vllm", 501, b"", "answer", None, True),
        ("vllm", 503, b"", "failing", None, True),
        ("llamacpp", 501, b'{"error":{"code":501,"type":"not_supported_error"}}', "answer", None, True),
        ("llamacpp", 500, b'{"error":{"code":500,"message":"Context size has been exceeded."}}', "busy", 429, False),
        ("llamacpp", 500, b'{"error":{"code":500,"message":"something else"}}', "failing", None, True),
    ],
)
def test_upstream_answers_are_judged_per_backend(
    backend: str, status: int, body: bytes, verdict: str, rewritten: int | None, counted: bool
) -> None:
    j = get_backend(backend).judge(status, body)
    assert j.verdict.value == verdict and j.counted is counted
    assert (j.rewrite[0] if j.rewrite else None) == rewritten
    if j.rewrite:
        assert msgspec.json.decode(j.rewrite[1])["error"]["code"] == "context_capacity_exceeded"
