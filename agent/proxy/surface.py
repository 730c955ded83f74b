"""What every answer of a proxied route carries on its way out, whoever made it.

``X-Gpufleet-Node``: an answer relayed from an instance already has the serving node's name (and
``X-Gpufleet-Instance``, relay.py); one the proxy made itself (a refusal, a 404 for an unknown
model, a 503, a degraded answer) gets this node's name, so an operator can tell which node
refused. No instance header on those: no instance served them.

Anthropic's routes (``/v1/messages``): its SDKs and Claude Code read errors as
``{"type": "error", "error": {"type": ..., "message": ...}}``. An error in OpenAI's shape (the
proxy's own refusals, and a server that answers in OpenAI's shape there) is given Anthropic's,
with the status code unchanged; an error already in Anthropic's shape (vLLM's) or in any other
(FastAPI's ``{"detail": ...}``) passes as it came.
"""

from __future__ import annotations

import msgspec

from gpufleet.facts import NODE_HEADER, REQUEST_ID_HEADER

from .exchange import Answer

# https://docs.anthropic.com/en/api/errors: the type for each status (any other 4xx is
# invalid_request_error, any other 5xx api_error).
ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


class _Error(msgspec.Struct):
    message: str


class _ErrorBody(msgspec.Struct):
    """OpenAI's error shape; Anthropic's is the same plus ``"type": "error"`` at the top."""

    error: _Error
    type: str | None = None


def labelled(answer: Answer, node_id: str, *, anthropic: bool = False) -> Answer:
    """An answer the proxy made or relayed whole, with this node's name on it (a relayed one
    already names its node), and on Anthropic's routes its errors in Anthropic's shape."""
    if answer.lines is None:  # relayed header lines always name the node (relay.py's _ours)
        answer.headers.setdefault(NODE_HEADER, node_id)
    if anthropic and answer.status >= 400:
        as_anthropic(answer)
    return answer


def as_anthropic(resp: Answer) -> None:
    """Rewrite an error body in OpenAI's shape to Anthropic's, in place; leave any other."""
    body = resp.body
    if b'"error"' not in body:
        return
    try:
        decoded = msgspec.json.decode(body, type=_ErrorBody)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return  # not an error shape we know: as it came
    if decoded.type == "error":
        return  # already Anthropic's
    status = resp.status
    kind = ANTHROPIC_ERROR_TYPES.get(status) or ("api_error" if status >= 500 else "invalid_request_error")
    doc: dict[str, object] = {"type": "error", "error": {"type": kind, "message": decoded.error.message}}
    if rid := resp.headers.get(REQUEST_ID_HEADER):
        doc["request_id"] = rid
    resp.body = msgspec.json.encode(doc)
    resp.headers["Content-Type"] = "application/json"
