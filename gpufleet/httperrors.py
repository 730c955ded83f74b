"""JSON error bodies in the OpenAI shape, used by both daemons' APIs and the agent's proxy; the
middleware that turns an unhandled exception into one; and the checks that turn a client's
unreadable request into a 4xx before any handler reads it.

Middleware order in an application: ``[error_middleware, bad_input_middleware, ...]``."""

from __future__ import annotations

from typing import Any

import msgspec
import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from gpufleet.httpserver import safe_reason

try:  # which Content-Encodings aiohttp decodes depends on what is installed
    from aiohttp.compression_utils import HAS_BROTLI, HAS_ZSTD
except ImportError:  # pragma: no cover - older aiohttp
    HAS_BROTLI = HAS_ZSTD = False

log = structlog.get_logger("gpufleet.httperrors")

# Request bodies with these codings are decoded by aiohttp as they are read (the decoded size
# counts against client_max_size: a decompression bomb gets 413) and forwarded decoded.
DECODED_ENCODINGS = frozenset(
    {"gzip", "deflate"} | ({"br"} if HAS_BROTLI else set()) | ({"zstd"} if HAS_ZSTD else set())
)


def json_response(obj: object, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=msgspec.json.encode(obj), status=status, content_type="application/json", headers=headers)


def error_response(
    status: int, message: str, type_: str, code: str | None = None, headers: dict[str, str] | None = None
) -> web.Response:
    return json_response({"error": {"message": message, "type": type_, "code": code}}, status, headers)


def bearer_refused(message: str, realm: str) -> web.Response:
    """401 for a missing or wrong bearer token, with the challenge that names the realm."""
    return error_response(
        401, message, "authentication_error", "unauthorized", {"WWW-Authenticate": f'Bearer realm="{realm}"'}
    )


@web.middleware
async def error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """The outermost middleware: an HTTP error aiohttp raises as text becomes a JSON error in
    OpenAI's shape, and an exception a handler lets escape becomes a logged 500."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status >= 400 and e.content_type != "application/json":
            return error_response(e.status, e.reason, "invalid_request_error" if e.status < 500 else "server_error")
        raise
    except Exception as e:  # one bad request must never take the server down
        log.exception("unhandled error in API handler", path=request.path, error=str(e))
        return error_response(500, "internal error", "server_error")


def _not_utf8(value: str) -> bool:
    """aiohttp decodes header bytes as UTF-8 with surrogateescape: a surrogate is a byte that was
    not UTF-8. Nothing downstream (token comparison, forwarding, logging) can encode it."""
    if value.isascii():
        return False
    try:
        value.encode()
    except UnicodeEncodeError:
        return True
    return False


def unreadable_request(request: web.Request) -> web.Response | None:
    """A 4xx for a request no handler could read: a header or the path not UTF-8, or a body
    Content-Encoding aiohttp does not decode (it would be forwarded labelled but not decoded)."""
    if _not_utf8(request.raw_path):
        return error_response(400, "the request path is not valid UTF-8", "invalid_request_error", "invalid_path")
    for name, value in request.headers.items():
        if _not_utf8(value) or _not_utf8(name):
            return error_response(
                400,
                f"header {name.encode(errors='replace').decode()!r} is not valid UTF-8",
                "invalid_request_error",
                "invalid_header",
            )
    coding = request.headers.get("Content-Encoding", "").strip().lower()
    if coding and coding != "identity" and coding not in DECODED_ENCODINGS:
        supported = ", ".join(sorted(DECODED_ENCODINGS))
        return error_response(
            415,
            f"Content-Encoding {coding!r} is not supported; use one of: {supported}",
            "invalid_request_error",
            "unsupported_content_encoding",
        )
    return None


@web.middleware
async def bad_input_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Runs inside the error middleware: refuses unreadable requests, and answers a body that
    broke while being read (bad chunking, corrupt gzip) as the client's error, not a 500."""
    if (refused := unreadable_request(request)) is not None:
        return refused
    try:
        return await handler(request)
    except (RequestPayloadError, HttpProcessingError) as e:
        cause = e.__cause__ if isinstance(e, RequestPayloadError) and e.__cause__ is not None else e
        return error_response(
            400, f"the request body could not be read: {safe_reason(cause, None)}", "invalid_request_error", "bad_body"
        )
