"""The simulated vLLM server's shared pieces, and the routes beyond chat, completions and embeddings.

``RestOfApi`` is mixed into ``simulated_server.Simulator``: OpenAI's Responses API, Anthropic's
Messages API, Jina/Cohere rerank and vLLM's score, audio transcription and translation, in the
shapes vLLM answers them (its ``vllm/entrypoints`` protocol models), usage included, so tests can
prove the proxy routes, authenticates and counts them. vLLM serves no ``/v1/images/generations``
and no ``/v1/audio/speech``: those are FastAPI's 404 here too. Output is deterministic, as the
rest of the simulator's: text from a hash of the prompt (or of the audio's bytes), rerank and
score from the texts' embeddings.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import math
import random
import struct
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import msgspec
from aiohttp import web

WORDS = (
    "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt ut labore et "
    "dolore magna aliqua enim ad minim veniam quis nostrud exercitation ullamco laboris nisi aliquip ex ea "
    "commodo consequat duis aute irure in reprehenderit voluptate velit esse cillum fugiat nulla pariatur"
).split()

MAX_AUDIO_BYTES = 25 * 2**20  # vLLM's VLLM_MAX_AUDIO_CLIP_FILESIZE_MB default
_encode = msgspec.json.Encoder().encode


def json_response(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=_encode(obj), status=status, content_type="application/json")


def sse(obj: Any) -> bytes:
    return b"data: " + _encode(obj) + b"\n\n"


class ApiError(Exception):
    """Raised anywhere under a handler; the middleware answers it with vLLM's error body."""

    def __init__(self, status: int, message: str, kind: str = "BadRequestError") -> None:
        super().__init__(message)
        self.status, self.kind = status, kind


def message_text(content: Any) -> str:
    """A message's text: content is a string or a list of parts, of which text parts count."""
    if isinstance(content, list):
        return " ".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return content if isinstance(content, str) else ""


def chat_prompt(body: dict[str, Any]) -> tuple[str, str]:
    """(the text that seeds the answer: the last user message, the whole prompt: all messages)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise ApiError(400, "messages must be a non-empty list of message objects.")
    texts = [message_text(m.get("content")) for m in messages]
    users = [t for m, t in zip(messages, texts, strict=True) if m.get("role") == "user"]
    return (users[-1] if users else ""), " ".join(texts)


def embed(text: str, dim: int) -> bytes:
    """A unit-norm float32 vector, as little-endian bytes, that depends only on the text."""
    rng = random.Random(hashlib.sha256(text.encode()).digest())
    vec = [rng.gauss(0.0, 1.0) for _ in range(dim)]
    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    return struct.pack(f"<{dim}f", *(v / norm for v in vec))


def words(seed_text: str, n: int) -> list[str]:
    """``n`` tokens of text that depend only on ``seed_text``."""
    start = int.from_bytes(hashlib.sha256(seed_text.encode()).digest()[:8], "big")
    return [WORDS[(start + i) % len(WORDS)] + " " for i in range(n)]


def named_event(kind: str, obj: Any) -> bytes:
    """An SSE event with its ``event:`` line, as the Responses and Anthropic streams send them."""
    return b"event: " + kind.encode() + b"\ndata: " + _encode(obj) + b"\n\n"


def is_true(value: Any) -> bool:
    """A form field read as a boolean, as vLLM's (pydantic's) form parsing reads it."""
    return isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on")


def responses_prompt(body: dict[str, Any]) -> tuple[str, str]:
    """(seed, whole prompt) of a Responses request: ``input`` is a string or a list of messages."""
    given = body.get("input")
    if isinstance(given, str):
        texts = [given]
    elif isinstance(given, list) and given and all(isinstance(m, dict) for m in given):
        texts = [message_text(m.get("content")) for m in given]
    else:
        raise ApiError(400, "input must be a string or a non-empty list of input items.")
    instructions = body.get("instructions")
    prompt = " ".join([instructions if isinstance(instructions, str) else "", *texts])
    return texts[-1], prompt


class RestOfApi:
    """The routes beyond chat, completions and embeddings, over the Simulator's engine (its
    slots, its decoding pace, its injected faults and counters)."""

    names: list[str]
    args: Any
    successes: int
    engine_free: asyncio.Event
    settings: Any

    async def read_request(self, request: web.Request) -> tuple[dict[str, Any], str]:
        raise NotImplementedError  # the Simulator's

    def count_inference(self) -> None:
        raise NotImplementedError

    def maybe_fail(self) -> None:
        raise NotImplementedError

    def max_tokens(self, body: dict[str, Any], prompt_tokens: int, key: str) -> int:
        raise NotImplementedError

    def slot(self, prompt_tokens: int) -> AbstractAsyncContextManager[None]:
        raise NotImplementedError

    def decode(self, tokens: list[str], started: float) -> AsyncIterator[str]:
        raise NotImplementedError

    async def sse_stream(
        self,
        request: web.Request,
        prompt_tokens: int,
        tokens: list[str],
        started: float,
        opening: Callable[[], list[bytes]],
        each: Callable[[str], bytes],
        closing: Callable[[], list[bytes]],
    ) -> web.StreamResponse:
        """A stream paced like ``generate``'s: ``opening`` events with the first engine output,
        one ``each`` per token, then ``closing``."""
        resp = web.StreamResponse(headers={"Cache-Control": "no-cache"})
        resp.content_type, resp.charset = "text/event-stream", "utf-8"
        await resp.prepare(request)
        try:
            async with self.slot(prompt_tokens):
                opened = False
                async for token in self.decode(tokens, started):
                    if not opened:
                        opened = True
                        for event in opening():
                            await resp.write(event)
                    await resp.write(each(token))
                for event in ([] if opened else opening()) + closing():
                    await resp.write(event)
            await resp.write_eof()
        except ConnectionResetError:
            return resp
        self.successes += 1
        return resp

    async def finish(self, prompt_tokens: int, tokens: list[str], started: float) -> str:
        """A non-streaming answer's text, decoded at the engine's pace."""
        async with self.slot(prompt_tokens):
            async for _ in self.decode(tokens, started):
                pass
        self.successes += 1
        return "".join(tokens)

    async def responses(self, request: web.Request) -> web.StreamResponse:
        """OpenAI's Responses API (``/v1/responses``), text in and out, as vLLM serves it."""
        started = time.monotonic()
        body, model = await self.read_request(request)
        seed_text, prompt_text = responses_prompt(body)
        p = max(1, len(prompt_text.split()))
        n = self.max_tokens(body, p, "max_output_tokens")
        self.maybe_fail()
        tokens = words(seed_text, n)
        rid, item_id, created = "resp_" + uuid.uuid4().hex, "msg_" + uuid.uuid4().hex, int(time.time())
        usage = {
            "input_tokens": p,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": n,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": p + n,
        }

        def part(text: str) -> dict[str, Any]:
            return {"type": "output_text", "text": text, "annotations": [], "logprobs": None}

        def item(text: str | None) -> dict[str, Any]:
            done = text is not None
            content = [part(text)] if done else []
            status = "completed" if done else "in_progress"
            return {"id": item_id, "type": "message", "role": "assistant", "status": status, "content": content}

        def response(text: str | None) -> dict[str, Any]:
            done = text is not None
            return {
                "id": rid,
                "object": "response",
                "created_at": created,
                "model": model,
                "status": "completed" if done else "in_progress",
                "output": [item(text)] if done else [],
                "instructions": body.get("instructions"),
                "max_output_tokens": n,
                "parallel_tool_calls": True,
                "tool_choice": "auto",
                "tools": [],
                "temperature": body.get("temperature", 1.0),
                "top_p": body.get("top_p", 1.0),
                "incomplete_details": None,
                "error": None,
                "metadata": None,
                "usage": usage if done else None,
            }

        if not body.get("stream"):
            return json_response(response(await self.finish(p, tokens, started)))
        seq = itertools.count()
        at = {"item_id": item_id, "output_index": 0, "content_index": 0}

        def ev(kind: str, **fields: Any) -> bytes:
            return named_event(kind, {"type": kind, "sequence_number": next(seq), **fields})

        text = "".join(tokens)
        return await self.sse_stream(
            request,
            p,
            tokens,
            started,
            lambda: [
                ev("response.created", response=response(None)),
                ev("response.in_progress", response=response(None)),
                ev("response.output_item.added", output_index=0, item=item(None)),
                ev("response.content_part.added", **at, part=part("")),
            ],
            lambda token: ev("response.output_text.delta", **at, delta=token, logprobs=[]),
            lambda: [
                ev("response.output_text.done", **at, text=text, logprobs=[]),
                ev("response.content_part.done", **at, part=part(text)),
                ev("response.output_item.done", output_index=0, item=item(text)),
                ev("response.completed", response=response(text)),
            ],
        )

    async def messages(self, request: web.Request) -> web.StreamResponse:
        """Anthropic's Messages API (``/v1/messages``), as vLLM serves it."""
        started = time.monotonic()
        body, model = await self.read_request(request)
        if body.get("max_tokens") is None:
            raise ApiError(400, "max_tokens: Field required")
        seed_text, prompt_text = chat_prompt(body)
        p = max(1, len(f"{message_text(body.get('system'))} {prompt_text}".split()))
        n = self.max_tokens(body, p, "max_tokens")
        self.maybe_fail()
        tokens = words(seed_text, n)
        mid = "msg_" + uuid.uuid4().hex
        if not body.get("stream"):
            text = await self.finish(p, tokens, started)
            return json_response(
                {
                    "id": mid,
                    "type": "message",
                    "role": "assistant",
                    "content": [{"type": "text", "text": text}],
                    "model": model,
                    "stop_reason": "max_tokens",
                    "stop_sequence": None,
                    "usage": {"input_tokens": p, "output_tokens": n},
                }
            )
        start = {
            "id": mid,
            "type": "message",
            "role": "assistant",
            "content": [],
            "model": model,
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": p, "output_tokens": 0},
        }

        def ev(kind: str, **fields: Any) -> bytes:
            return named_event(kind, {"type": kind, **fields})

        return await self.sse_stream(
            request,
            p,
            tokens,
            started,
            lambda: [
                ev("message_start", message=start),
                ev("content_block_start", index=0, content_block={"type": "text", "text": ""}),
            ],
            lambda token: ev("content_block_delta", index=0, delta={"type": "text_delta", "text": token}),
            lambda: [
                ev("content_block_stop", index=0),
                ev(
                    "message_delta",
                    delta={"stop_reason": "max_tokens", "stop_sequence": None},
                    usage={"input_tokens": p, "output_tokens": n},
                ),
                ev("message_stop"),
            ],
        )

    async def count_tokens(self, request: web.Request) -> web.Response:
        body, _ = await self.read_request(request)
        _, prompt_text = chat_prompt(body)
        return json_response({"input_tokens": max(1, len(f"{message_text(body.get('system'))} {prompt_text}".split()))})

    async def pooled(self, prompt_tokens: int) -> None:
        """A pooling request's turn on the engine (one forward pass, no decoding)."""
        async with self.slot(prompt_tokens):
            await self.engine_free.wait()
            await asyncio.sleep(self.settings.latency_ms / 1000)
        self.successes += 1

    async def rerank(self, request: web.Request) -> web.Response:
        """Jina/Cohere rerank (``/rerank``, ``/v1/rerank``, ``/v2/rerank``), as vLLM serves it."""
        body, model = await self.read_request(request)
        query, docs = body.get("query"), body.get("documents")
        texts = [d.get("text") if isinstance(d, dict) else d for d in docs] if isinstance(docs, list) else []
        if not isinstance(query, str) or not texts or not all(isinstance(t, str) for t in texts):
            raise ApiError(400, "query must be a string and documents a non-empty list of strings.")
        top_n = body.get("top_n") or len(texts)
        if type(top_n) is not int or top_n < 0:
            raise ApiError(400, f"top_n must be a non-negative integer, got {top_n!r}.")
        self.maybe_fail()
        p = sum(max(1, len(query.split())) + max(1, len(t.split())) for t in texts)
        await self.pooled(p)
        scores = [self.relevance(query, t) for t in texts]
        ranked = sorted(range(len(texts)), key=lambda i: -scores[i])[:top_n]
        results = [{"index": i, "document": {"text": texts[i]}, "relevance_score": scores[i]} for i in ranked]
        usage = {"prompt_tokens": p, "total_tokens": p}
        return json_response({"id": "rerank-" + uuid.uuid4().hex, "model": model, "usage": usage, "results": results})

    async def score(self, request: web.Request) -> web.Response:
        """vLLM's pairwise score (``/score``, ``/v1/score``): text_1 against each text_2."""
        body, model = await self.read_request(request)
        left, right = body.get("text_1"), body.get("text_2")
        right = [right] if isinstance(right, str) else right
        left = [left] * len(right) if isinstance(left, str) and isinstance(right, list) else left
        if not isinstance(left, list) or not isinstance(right, list) or not right or len(left) != len(right):
            raise ApiError(400, "text_1 must be a string or a list as long as text_2.")
        if not all(isinstance(t, str) for t in left + right):
            raise ApiError(400, "text_1 and text_2 must hold strings.")
        self.maybe_fail()
        p = sum(max(1, len(a.split())) + max(1, len(b.split())) for a, b in zip(left, right, strict=True))
        await self.pooled(p)
        data = [
            {"index": i, "object": "score", "score": self.relevance(a, b)}
            for i, (a, b) in enumerate(zip(left, right, strict=True))
        ]
        return json_response(
            {
                "id": "score-" + uuid.uuid4().hex,
                "object": "list",
                "created": int(time.time()),
                "model": model,
                "data": data,
                "usage": {"prompt_tokens": p, "total_tokens": p, "completion_tokens": 0, "prompt_tokens_details": None},
            }
        )

    def relevance(self, a: str, b: str) -> float:
        """In [0, 1], 1 for the same text: the cosine of the two texts' embeddings, rescaled."""
        dim = self.args.embedding_dim
        va, vb = struct.unpack(f"<{dim}f", embed(a, dim)), struct.unpack(f"<{dim}f", embed(b, dim))
        return min(1.0, max(0.0, (1.0 + sum(x * y for x, y in zip(va, vb, strict=True))) / 2))

    async def transcriptions(self, request: web.Request, translate: bool) -> web.StreamResponse:
        """``/v1/audio/transcriptions`` and ``/translations``: a multipart form with the audio
        file; the text depends only on the file's bytes, one second per 32000 bytes (16 kHz,
        16-bit mono)."""
        started = time.monotonic()
        self.count_inference()
        try:
            form = await request.post()
        except ValueError as e:
            raise ApiError(400, f"Invalid form body: {e}") from None
        model = str(form.get("model") or self.names[0])
        if model not in self.names:
            raise ApiError(404, f"The model `{model}` does not exist.", "NotFoundError")
        upload = form.get("file")
        if not isinstance(upload, web.FileField):
            raise ApiError(400, "Expected 'file' to be a file-like object.")
        audio = upload.file.read()
        if len(audio) > MAX_AUDIO_BYTES:
            raise ApiError(400, f"Maximum file size exceeded ({MAX_AUDIO_BYTES // 2**20} MB).")
        fmt = str(form.get("response_format") or "json")
        if fmt not in ("json", "text"):
            raise ApiError(400, f"Currently only support response_format `text` or `json`, got {fmt!r}.")
        seconds = max(1, math.ceil(len(audio) / 32000))
        p, n = 50 * seconds, min(64, 4 + seconds)  # Whisper's encoder: 1500 frames per 30 s
        self.maybe_fail()
        tokens = words(hashlib.sha256(audio).hexdigest(), n)
        if not is_true(form.get("stream")):
            text = (await self.finish(p, tokens, started)).strip()
            if fmt == "text":
                return web.Response(text=text, content_type="text/plain")
            return json_response({"text": text, "usage": {"type": "duration", "seconds": seconds}})
        head = {
            "id": ("trsl-" if translate else "trsc-") + uuid.uuid4().hex,
            "object": "translation.chunk" if translate else "transcription.chunk",
            "created": int(time.time()),
            "model": model,
        }
        usage = {"prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n}

        def closing() -> list[bytes]:
            done = [sse({**head, "choices": [{"delta": {}, "finish_reason": "stop", "stop_reason": None}]})]
            if is_true(form.get("stream_include_usage")):
                done.append(sse({**head, "choices": [], "usage": usage}))
            return [*done, b"data: [DONE]\n\n"]

        return await self.sse_stream(
            request,
            p,
            tokens,
            started,
            list,
            lambda token: sse({**head, "choices": [{"delta": {"content": token}}]}),
            closing,
        )


def add_routes(app: web.Application, sim: RestOfApi) -> None:
    app.router.add_post("/v1/responses", sim.responses)
    app.router.add_post("/v1/messages", sim.messages)
    app.router.add_post("/v1/messages/count_tokens", sim.count_tokens)
    for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
        app.router.add_post(path, sim.rerank)
    for path in ("/score", "/v1/score"):
        app.router.add_post(path, sim.score)
    app.router.add_post("/v1/audio/transcriptions", lambda r: sim.transcriptions(r, translate=False))
    app.router.add_post("/v1/audio/translations", lambda r: sim.transcriptions(r, translate=True))
