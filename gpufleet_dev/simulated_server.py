"""A stand-in for ``vllm serve``: a real process speaking vLLM's OpenAI-compatible HTTP API.

Demos and tests need something that behaves like a model server (slow to start, streams tokens,
exports vLLM's metrics, crashes, hangs) on machines without a GPU. It takes ``vllm serve``'s
command line, so gpufleet's vllm backend can launch it unchanged through ``launcher``. Output is
deterministic: text depends only on the prompt, embeddings only on the input, injected errors on
``--seed``. Faults come from flags, ``SIM_*`` environment variables or ``POST /sim/control``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import functools
import math
import os
import random
import signal
import struct
import sys
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from aiohttp import web

from gpufleet.tasks import wait_set
from gpufleet_dev.simulated_routes import (
    MAX_AUDIO_BYTES,
    ApiError,
    RestOfApi,
    add_routes,
    chat_prompt,
    embed,
    json_response,
    sse,
    words,
)

VERSION = "0.0.0-sim"
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
NUMERIC_CONTROLS = {"latency_ms": math.inf, "tokens_per_second": math.inf, "error_rate": 1.0}  # name: max
BOOL_CONTROLS = ("hang", "hang_inference", "fail_health", "crash")


def log(msg: str, level: str = "INFO") -> None:
    # vLLM's own lines carry a timestamp and source; uvicorn's ("INFO:     ...") do not. Mimic both,
    # so whoever reads the instance's log file sees what the real server would have written.
    stamp = time.strftime("%m-%d %H:%M:%S")
    print(f"{level} {stamp} [simulated_server.py] {msg}", file=sys.stderr, flush=True)


def uvicorn_log(msg: str, level: str = "INFO") -> None:
    print(f"{level + ':':<9} {msg}", file=sys.stderr, flush=True)


def crash(reason: str) -> None:
    # os._exit skips all cleanup, as when a CUDA fault takes the process down.
    log(f"{reason}: CUDA error: an illegal memory access was encountered (simulated)", "ERROR")
    os._exit(1)


async def read_json(request: web.Request) -> Any:
    try:
        return msgspec.json.decode(await request.read())
    except msgspec.DecodeError as exc:
        raise ApiError(400, f"Invalid JSON body: {exc}") from None


@dataclasses.dataclass
class Settings:
    """What /sim/control may change while the server runs."""

    latency_ms: float
    tokens_per_second: float
    error_rate: float
    fail_health: bool
    hang: bool = False
    # A wedged engine behind a live API server (a stuck collective, a GPU fault the health
    # check does not see): /health, /v1/models and /metrics answer, inference never finishes.
    # Requests are accepted and held (counted as running); turning it off lets them go on.
    hang_inference: bool = False


class Simulator(RestOfApi):
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.names: list[str] = args.served_model_name or [args.model]
        self.settings = Settings(
            args.latency_ms, args.tokens_per_second, args.error_rate, args.fail_health, False, args.hang_inference
        )
        self.engine_free = asyncio.Event()  # set unless hang_inference holds the engine
        self.set_engine()
        self.rng = random.Random(args.seed)
        self.created = int(time.time())
        self.slots = asyncio.Semaphore(args.max_num_seqs)
        self.inference_requests = self.running = self.waiting = 0
        self.prompt_tokens = self.generation_tokens = self.successes = 0
        self.ttft_buckets = [0] * len(TTFT_BUCKETS)  # per bucket, cumulative as Prometheus wants
        self.ttft_sum = 0.0
        self.ttft_count = 0

    def set_engine(self) -> None:
        if self.settings.hang_inference:
            self.engine_free.clear()
        else:
            self.engine_free.set()

    def count_inference(self) -> None:
        """Every inference request moves the crash/hang clocks, even one that fails validation."""
        self.inference_requests += 1
        if self.inference_requests == self.args.crash_after:
            crash(f"--crash-after {self.args.crash_after} reached")
        if self.inference_requests == self.args.hang_after:
            log(f"--hang-after {self.args.hang_after} reached: nothing more will be answered", "WARNING")
            self.settings.hang = True

    @contextlib.asynccontextmanager
    async def slot(self, prompt_tokens: int) -> AsyncIterator[None]:
        """One of --max-num-seqs sequences; requests beyond that queue, counted as waiting."""
        self.waiting += 1
        try:
            await self.slots.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        self.prompt_tokens += prompt_tokens
        try:
            yield
        finally:  # also when the client disconnects and aiohttp cancels the handler
            self.running -= 1
            self.slots.release()

    async def decode(self, tokens: list[str], started: float) -> AsyncIterator[str]:
        """Yield tokens at a decoder's pace: --latency-ms of prefill, then 1/TPS apart."""
        await self.engine_free.wait()  # hang_inference: held here, inside its slot, as in a stuck step
        if self.settings.latency_ms > 0:
            await asyncio.sleep(self.settings.latency_ms / 1000)
        tps = self.settings.tokens_per_second
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for i, token in enumerate(tokens):
            if tps > 0:  # deadlines counted from t0, so timer slop does not add up over long outputs
                await asyncio.sleep(max(0.0, t0 + (i + 1) / tps - loop.time()))
            if not self.engine_free.is_set():  # a step stuck mid-generation stops every sequence
                await self.engine_free.wait()
            if i == 0:  # time to first token includes queueing, as in vLLM
                ttft = time.monotonic() - started
                self.ttft_sum += ttft
                self.ttft_count += 1
                pairs = zip(self.ttft_buckets, TTFT_BUCKETS, strict=True)
                self.ttft_buckets = [n + (ttft <= le) for n, le in pairs]
            self.generation_tokens += 1
            yield token

    async def read_request(self, request: web.Request) -> tuple[dict[str, Any], str]:
        """Count an inference request, parse it and check its model."""
        self.count_inference()
        body = await read_json(request)
        if not isinstance(body, dict):
            raise ApiError(400, "The request body must be a JSON object.")
        if body.get("model") not in self.names:
            raise ApiError(404, f"The model `{body.get('model')}` does not exist.", "NotFoundError")
        return body, body["model"]

    def maybe_fail(self) -> None:
        """--error-rate: drawn after validation, since a failing engine still parses requests."""
        if self.settings.error_rate > 0 and self.rng.random() < self.settings.error_rate:
            raise ApiError(500, "Simulated engine failure (error_rate).", "InternalServerError")

    def max_tokens(self, body: dict[str, Any], prompt_tokens: int, key: str) -> int:
        # Chat takes the newer max_completion_tokens and the older max_tokens; the first one set wins.
        value = next((body[k] for k in (key, "max_tokens") if body.get(k) is not None), 16)
        if type(value) is not int or value < 1:
            raise ApiError(400, f"{key} must be an integer of at least 1, got {value!r}.")
        if body.get("n") not in (None, 1):
            raise ApiError(400, "The simulated server supports only n=1.")
        room = self.args.max_model_len - prompt_tokens
        if room < 1:  # vLLM refuses a prompt that leaves no room rather than truncating it
            raise ApiError(
                400,
                f"This model's maximum context length is {self.args.max_model_len} tokens. "
                f"However, your request has {prompt_tokens} input tokens.",
            )
        return min(value, room)

    async def generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        """/v1/chat/completions (chat=True) and /v1/completions: same engine, different shapes."""
        started = time.monotonic()
        body, model = await self.read_request(request)
        seed_text, prompt_text = chat_prompt(body) if chat else completion_prompt(body)
        prompt_tokens = max(1, len(prompt_text.split()))
        n = self.max_tokens(body, prompt_tokens, "max_completion_tokens" if chat else "max_tokens")
        self.maybe_fail()
        tokens = words(seed_text, n)
        usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + n, "completion_tokens": n}
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        head = {"id": rid, "object": "", "created": int(time.time()), "model": model}

        if not body.get("stream"):
            async with self.slot(prompt_tokens):
                async for _ in self.decode(tokens, started):
                    pass
            self.successes += 1
            text = "".join(tokens)
            message = {"role": "assistant", "content": text, "tool_calls": []}
            out = {"message": message} if chat else {"text": text}
            choice = {"index": 0, **out, "logprobs": None, "finish_reason": "length", "stop_reason": None}
            return json_response(
                {
                    **head,
                    "object": "chat.completion" if chat else "text_completion",
                    "choices": [choice],
                    "usage": usage,
                    "prompt_logprobs": None,
                }
            )

        head["object"] = "chat.completion.chunk" if chat else "text_completion"

        def chunk(piece: dict[str, Any], finish: str | None = None) -> bytes:
            choice = {"index": 0, **piece, "logprobs": None, "finish_reason": finish}
            return sse({**head, "choices": [choice]})

        resp = web.StreamResponse(headers={"Cache-Control": "no-cache"})
        resp.content_type, resp.charset = "text/event-stream", "utf-8"
        await resp.prepare(request)
        try:
            async with self.slot(prompt_tokens):
                # Like vLLM, the role chunk goes out with the first engine output (after prefill),
                # not as soon as the request is accepted. One awaited write per token: each goes
                # to the socket as it is made, not in a batch.
                role_sent = not chat
                async for token in self.decode(tokens, started):
                    if not role_sent:
                        await resp.write(chunk({"delta": {"role": "assistant", "content": ""}}))
                        role_sent = True
                    await resp.write(chunk({"delta": {"content": token}} if chat else {"text": token}))
                if not role_sent:
                    await resp.write(chunk({"delta": {"role": "assistant", "content": ""}}))
                await resp.write(chunk({"delta": {}} if chat else {"text": ""}, "length"))
            if isinstance(options := body.get("stream_options"), dict) and options.get("include_usage"):
                await resp.write(sse({**head, "choices": [], "usage": usage}))
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except ConnectionResetError:  # client gone mid-stream; the slot is already given back
            return resp
        self.successes += 1
        return resp

    async def embeddings(self, request: web.Request) -> web.Response:
        body, model = await self.read_request(request)
        inputs, fmt = body.get("input"), body.get("encoding_format") or "float"
        if isinstance(inputs, str) or is_token_ids(inputs):
            inputs = [inputs]
        if not isinstance(inputs, list) or not inputs or not all(map(is_text_or_ids, inputs)):
            raise ApiError(400, "input must be a string, a list of strings, or token ids.")
        if fmt not in ("float", "base64"):
            raise ApiError(400, f"encoding_format must be 'float' or 'base64', got {fmt!r}.")
        self.maybe_fail()
        prompt_tokens = sum(max(1, len(x.split())) if isinstance(x, str) else len(x) for x in inputs)
        dim, data = self.args.embedding_dim, []
        async with self.slot(prompt_tokens):
            await self.engine_free.wait()
            await asyncio.sleep(self.settings.latency_ms / 1000)
            for i, item in enumerate(inputs):
                packed = embed(item if isinstance(item, str) else repr(item), dim)
                # The openai SDK asks for base64 unless told otherwise: little-endian float32 bytes.
                as_float = struct.unpack(f"<{dim}f", packed)
                value = base64.b64encode(packed).decode() if fmt == "base64" else as_float
                data.append({"object": "embedding", "embedding": value, "index": i})
        self.successes += 1
        return json_response(
            {
                "id": "embd-" + uuid.uuid4().hex,
                "object": "list",
                "created": int(time.time()),
                "model": model,
                "data": data,
                "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
            }
        )

    async def models(self, request: web.Request) -> web.Response:
        card = {
            "object": "model",
            "created": self.created,
            "owned_by": "vllm",
            "root": self.args.model,
            "parent": None,
            "max_model_len": self.args.max_model_len,
            "permission": [],
        }
        return json_response({"object": "list", "data": [{"id": name, **card} for name in self.names]})

    async def metrics(self, request: web.Request) -> web.Response:
        label = 'model_name="{}"'.format(self.names[0].replace("\\", "\\\\").replace('"', '\\"'))
        lines: list[str] = []

        def metric(name: str, kind: str, help_: str, *samples: tuple[str, str, float]) -> None:
            lines.extend((f"# HELP {name} {help_}", f"# TYPE {name} {kind}"))
            lines.extend(f"{name}{suffix}{{{labels}}} {float(v)!r}" for suffix, labels, v in samples)

        metric(
            "vllm:num_requests_running",
            "gauge",
            "Number of requests in model execution batches.",
            ("", label, self.running),
        )
        metric(
            "vllm:num_requests_waiting",
            "gauge",
            "Number of requests waiting to be processed.",
            ("", label, self.waiting),
        )
        metric(
            "vllm:kv_cache_usage_perc",
            "gauge",
            "KV-cache usage. 1 means 100 percent usage.",
            ("", label, self.running / self.args.max_num_seqs),
        )
        metric(
            "vllm:prompt_tokens",
            "counter",
            "Number of prefill tokens processed.",
            ("_total", label, self.prompt_tokens),
        )
        metric(
            "vllm:generation_tokens",
            "counter",
            "Number of generation tokens processed.",
            ("_total", label, self.generation_tokens),
        )
        metric(
            "vllm:request_success",
            "counter",
            "Count of successfully processed requests.",
            ("_total", f'finished_reason="length",{label}', self.successes),
        )
        le_n = [*zip(TTFT_BUCKETS, self.ttft_buckets, strict=True), ("+Inf", self.ttft_count)]
        metric(
            "vllm:time_to_first_token_seconds",
            "histogram",
            "Histogram of time to first token (seconds).",
            *[("_bucket", f'le="{le}",{label}', n) for le, n in le_n],
            ("_sum", label, self.ttft_sum),
            ("_count", label, self.ttft_count),
        )
        resp = web.Response(text="\n".join(lines) + "\n")
        resp.headers["Content-Type"] = "text/plain; version=0.0.4; charset=utf-8"
        return resp

    async def control(self, request: web.Request) -> web.Response:
        names = ("inference_requests", "running", "waiting", "prompt_tokens", "generation_tokens", "successes")
        counters = {n: getattr(self, n) for n in names}
        status = {"settings": dataclasses.asdict(self.settings), "counters": counters}
        if request.method == "GET":
            return json_response(status)
        body = await read_json(request)
        check_controls(body)
        do_crash = body.pop("crash", False)
        for key, value in body.items():
            setattr(self.settings, key, float(value) if key in NUMERIC_CONTROLS else value)
        self.set_engine()
        log(f"/sim/control: {body}{' and crash' if do_crash else ''}", "WARNING")
        if do_crash:  # answer first, so the caller knows the command arrived, then die abruptly
            asyncio.get_running_loop().call_later(0.05, crash, "crash requested through /sim/control")
        return json_response({"ok": True, "settings": dataclasses.asdict(self.settings)})


def check_controls(body: Any) -> None:
    if not isinstance(body, dict):
        raise ApiError(400, "body must be a JSON object")
    for key, value in body.items():
        if key in NUMERIC_CONTROLS:
            top = NUMERIC_CONTROLS[key]
            if type(value) not in (int, float) or not 0 <= value <= top:
                raise ApiError(400, f"{key} must be a number from 0 to {top}")
        elif key in BOOL_CONTROLS:
            if not isinstance(value, bool):
                raise ApiError(400, f"{key} must be true or false")
        else:
            raise ApiError(400, f"unknown setting {key!r}; known: {[*NUMERIC_CONTROLS, *BOOL_CONTROLS]}")


def is_token_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(type(t) is int for t in value)


def is_text_or_ids(value: Any) -> bool:
    return isinstance(value, str) or is_token_ids(value)


def completion_prompt(body: dict[str, Any]) -> tuple[str, str]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and not is_token_ids(prompt):
        prompt = prompt[0]  # a batch: only the first prompt is answered
    if is_token_ids(prompt):  # one "word" per token id, so usage counts them right
        prompt = " ".join(map(str, prompt))
    if not isinstance(prompt, str):
        raise ApiError(400, "prompt must be a string, a list of strings, or token ids.")
    return prompt, prompt


def build_app(sim: Simulator) -> web.Application:
    @web.middleware
    async def middleware(request: web.Request, handler: Any) -> web.StreamResponse:
        # A wedged engine answers nothing, health probes included; /sim/control stays reachable
        # so a demo can lift the hang it injected.
        if sim.settings.hang and request.path != "/sim/control":
            await asyncio.get_running_loop().create_future()  # never resolves
        try:
            resp = await handler(request)
        except ApiError as e:
            if request.path.startswith("/v1/messages"):  # vLLM's Anthropic router answers in Anthropic's shape
                resp = json_response({"type": "error", "error": {"type": e.kind, "message": str(e)}}, e.status)
            else:
                resp = json_response(
                    {"object": "error", "message": str(e), "type": e.kind, "param": None, "code": e.status}, e.status
                )
        except web.HTTPException as exc:  # unknown route or method: FastAPI's JSON shape, as vLLM
            resp = json_response({"detail": exc.reason}, exc.status)
        if not sim.args.disable_uvicorn_access_log:
            peer = request.transport.get_extra_info("peername") if request.transport else None
            who = f"{peer[0]}:{peer[1]}" if peer else "-"
            uvicorn_log(f'{who} - "{request.method} {request.path_qs} HTTP/1.1" {resp.status} {resp.reason}')
        return resp

    async def health(request: web.Request) -> web.Response:
        return web.Response(status=500 if sim.settings.fail_health else 200)

    async def version(request: web.Request) -> web.Response:
        return json_response({"version": VERSION})

    # Audio uploads are larger than aiohttp's default 1 MiB; vLLM refuses audio over 25 MB itself.
    app = web.Application(middlewares=[middleware], client_max_size=2 * MAX_AUDIO_BYTES)
    app.router.add_get("/health", health)
    app.router.add_get("/version", version)
    app.router.add_get("/v1/models", sim.models)
    app.router.add_get("/metrics", sim.metrics)
    app.router.add_post("/v1/chat/completions", functools.partial(sim.generate, chat=True))
    app.router.add_post("/v1/completions", functools.partial(sim.generate, chat=False))
    app.router.add_post("/v1/embeddings", sim.embeddings)
    add_routes(app, sim)  # responses, messages, rerank, score, audio (simulated_routes.py)
    app.router.add_route("*", "/sim/control", sim.control)
    return app


async def serve(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    log(f"vLLM API server version {VERSION}")
    log(
        f"args: model={args.model!r} served_model_name={args.served_model_name} max_model_len="
        f"{args.max_model_len} max_num_seqs={args.max_num_seqs} dtype={args.dtype} "
        f"gpu_memory_utilization={args.gpu_memory_utilization} tp={args.tensor_parallel_size}"
    )
    # As with vLLM, nothing listens while the weights load: probes meet "connection refused".
    log(f"Starting to load model {args.model} (simulated: {args.startup_delay:g} s)...")
    await wait_set(stop, args.startup_delay)
    if stop.is_set():
        log("Stopped while loading the model.")
        return 0
    log(f"Loading weights took {args.startup_delay:.2f} seconds")

    sim = Simulator(args)
    # handler_cancellation: a client that disconnects aborts its request, as vLLM aborts the sequence.
    # shutdown_timeout: aiohttp may wait it twice (let requests finish, then let cancelled ones end),
    # so a stuck request still lets SIGTERM finish in well under a second.
    runner = web.AppRunner(build_app(sim), access_log=None, handler_cancellation=True, shutdown_timeout=0.3)
    await runner.setup()
    try:
        await web.TCPSite(runner, args.host, args.port, reuse_address=True).start()
    except OSError as exc:
        uvicorn_log(
            f"[Errno {exc.errno}] error while attempting to bind on address "
            f"({args.host!r}, {args.port}): {exc.strerror}",
            "ERROR",
        )
        await runner.cleanup()
        return 1
    uvicorn_log(f"Started server process [{os.getpid()}]")
    uvicorn_log("Waiting for application startup.")
    uvicorn_log("Application startup complete.")
    uvicorn_log(f"Uvicorn running on http://{args.host}:{args.port} (Press CTRL+C to quit)")
    await stop.wait()
    uvicorn_log("Shutting down")
    await runner.cleanup()  # stop listening, let requests finish briefly, cancel the rest
    uvicorn_log(f"Finished server process [{os.getpid()}]")
    return 0


def _env(name: str, conv: Any, default: Any) -> Any:
    """A simulation flag's default: $SIM_<NAME> when set, so a launcher can pass faults by env."""
    raw = os.environ.get(f"SIM_{name.upper()}")
    if raw is None:
        return default
    try:
        return conv(raw)
    except ValueError:
        sys.exit(f"invalid SIM_{name.upper()}={raw!r}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpufleet-simulated-server", description=__doc__.splitlines()[0])
    p.add_argument("words", nargs="*", metavar="[serve] MODEL", help="a leading 'serve' is ignored")
    v = p.add_argument_group("vllm serve options (unknown ones are ignored with a warning)")
    v.add_argument("--host", default="127.0.0.1")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--served-model-name", nargs="+", metavar="NAME")
    v.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    v.add_argument("--max-model-len", type=int, default=4096)
    v.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    v.add_argument("--max-num-seqs", type=int, default=256)
    v.add_argument("--dtype", default="auto")
    v.add_argument("--trust-remote-code", action="store_true")
    v.add_argument("--enforce-eager", action="store_true")
    v.add_argument("--disable-uvicorn-access-log", action="store_true")
    v.add_argument("--seed", type=int, default=_env("seed", int, None), help="seeds the error-rate draws")
    s = p.add_argument_group("simulation (each also settable as $SIM_<NAME>, e.g. SIM_STARTUP_DELAY)")
    s.add_argument("--startup-delay", type=float, default=_env("startup_delay", float, 0.0), metavar="S")
    s.add_argument("--latency-ms", type=float, default=_env("latency_ms", float, 0.0), metavar="MS")
    s.add_argument(
        "--tokens-per-second",
        type=float,
        default=_env("tokens_per_second", float, 200.0),
        metavar="TPS",
        help="0: no per-token delay",
    )
    s.add_argument("--error-rate", type=float, default=_env("error_rate", float, 0.0), metavar="P")
    s.add_argument("--crash-after", type=int, default=_env("crash_after", int, 0), metavar="N")
    s.add_argument("--hang-after", type=int, default=_env("hang_after", int, 0), metavar="N")
    s.add_argument("--embedding-dim", type=int, default=_env("embedding_dim", int, 384), metavar="D")
    s.add_argument(
        "--hang-inference",
        action="store_true",
        default=_env("hang_inference", lambda r: r.lower() in ("1", "true", "yes", "on"), False),
        help="health, models and metrics answer; inference requests never finish",
    )
    s.add_argument(
        "--fail-health",
        action="store_true",
        default=_env("fail_health", lambda r: r.lower() in ("1", "true", "yes", "on"), False),
    )
    # Intermixed, so options may come before MODEL; known-args, so vLLM options we lack do not
    # stop a launch (their values may land in words, and are reported with them).
    args, unknown = p.parse_known_intermixed_args(argv)
    words = args.words[1:] if args.words[:1] == ["serve"] and len(args.words) > 1 else args.words
    if not words:
        p.error("MODEL is required")
    args.model = words[0]
    if unknown or words[1:]:
        log(f"ignoring arguments the simulated server has no use for: {' '.join(unknown + words[1:])}", "WARNING")
    for name in ("startup_delay", "latency_ms", "tokens_per_second", "crash_after", "hang_after"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0")
    if not 0 <= args.error_rate <= 1:
        p.error("--error-rate must be between 0 and 1")
    if min(args.max_num_seqs, args.embedding_dim, args.max_model_len) < 1:
        p.error("--max-num-seqs, --embedding-dim and --max-model-len must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:  # optional, as under uvicorn: a faster event loop when installed
        import uvloop

        loop_factory: Any = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        sys.exit(runner.run(serve(args)))


if __name__ == "__main__":
    main()
