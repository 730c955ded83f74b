"""JSON error bodies in the OpenAI shape, used by the API and (later) the proxy alike."""

from __future__ import annotations

import msgspec
from aiohttp import web


def json_response(obj: object, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=msgspec.json.encode(obj), status=status, content_type="application/json", headers=headers)


def error_response(
    status: int, message: str, type_: str, code: str | None = None, headers: dict[str, str] | None = None
) -> web.Response:
    return json_response({"error": {"message": message, "type": type_, "code": code}}, status, headers)
