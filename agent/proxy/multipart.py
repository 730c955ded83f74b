"""The few text fields the proxy needs (``model``, ``stream``) from a multipart/form-data body.

Audio uploads (``/v1/audio/transcriptions``) are forms: a file part of up to tens of megabytes
and small text fields, in any order. The proxy holds every request body once, as one ``bytes``
(it has to: a retry on another instance and the hop signature need the same bytes again), so
the form is read in place over that object: each part's end is found with ``bytes.find`` from
an offset, only a part's header lines and the values of the wanted text fields are copied and
decoded, and a file part is never sliced or decoded (its bytes are skipped, not copied). The
body then goes on exactly as it came. Streaming the form instead would save nothing here: the
bytes must be kept for retries either way.

RFC 2046 §5.1.1 and RFC 7578: ``--boundary`` lines separate the parts, a part's headers end at
its first blank line, the last boundary is followed by ``--``. Anything else is refused as
``FormError`` (the proxy answers 400) rather than guessed at.
"""

from __future__ import annotations

import re

# A part's header block larger than this is not a form a client library wrote.
MAX_PART_HEADERS = 16 * 1024
# A wanted field longer than this (a model name, a stream flag) is refused, not copied.
MAX_FIELD_BYTES = 4096
_PARAM = re.compile(r';\s*([!#$%&\'*+.^_`|~0-9A-Za-z-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)')


class FormError(ValueError):
    """The body is not the multipart/form-data its Content-Type says."""


def boundary_of(content_type: str) -> bytes:
    """The boundary of a ``multipart/form-data`` Content-Type; FormError if it has none."""
    kind, _, _ = content_type.partition(";")
    if kind.strip().lower() != "multipart/form-data":
        raise FormError(f"the request body must be multipart/form-data, not {kind.strip() or 'unlabelled'!r}")
    boundary = _params(content_type).get("boundary", "")
    # RFC 2046: 1 to 70 characters, no trailing space.
    if not 0 < len(boundary) <= 70 or boundary.endswith(" ") or not boundary.isascii():
        raise FormError("the Content-Type has no valid multipart boundary")
    return boundary.encode()


def form_fields(body: bytes, content_type: str, wanted: frozenset[str]) -> dict[str, str]:
    """The first value of each text field in ``wanted`` (file parts are skipped unread).

    Every part is walked, so a form cut short or malformed anywhere is refused (FormError)
    whatever order its fields come in."""
    delimiter = b"--" + boundary_of(content_type)
    found: dict[str, str] = {}
    start = body.find(delimiter)
    if start < 0 or (start > 0 and body[start - 2 : start] != b"\r\n"):
        raise FormError("the body has no multipart boundary line")
    pos = start + len(delimiter)
    next_part = b"\r\n" + delimiter
    while True:
        if body.startswith(b"--", pos):
            return found  # the closing delimiter; an epilogue after it is ignored
        line_end = body.find(b"\r\n", pos, pos + 256)
        if line_end < 0 or body[pos:line_end].strip(b" \t"):
            raise FormError("a multipart boundary line is malformed")
        head_end = body.find(b"\r\n\r\n", line_end, line_end + MAX_PART_HEADERS)
        if head_end < 0:
            raise FormError("a multipart part's headers do not end (no blank line)")
        name, is_file = _disposition(body[line_end + 2 : head_end])
        content = head_end + 4
        end = body.find(next_part, content)
        if end < 0:
            raise FormError("the multipart body ends without its closing boundary")
        if name in wanted and not is_file and name not in found:
            if end - content > MAX_FIELD_BYTES:
                raise FormError(f"the form field {name!r} is longer than {MAX_FIELD_BYTES} bytes")
            try:
                found[name] = body[content:end].decode()
            except UnicodeDecodeError:
                raise FormError(f"the form field {name!r} is not valid UTF-8") from None
        pos = end + len(next_part)


def _disposition(headers: bytes) -> tuple[str | None, bool]:
    """(the part's field name, whether it is a file) from its Content-Disposition."""
    for line in headers.split(b"\r\n"):
        key, sep, value = line.partition(b":")
        if sep and key.strip().lower() == b"content-disposition":
            text = value.decode(errors="replace")
            if text.partition(";")[0].strip().lower() != "form-data":
                raise FormError("a multipart part is not form-data")
            params = _params(text)
            if "name" not in params:
                raise FormError("a multipart part has no field name")
            return params["name"], "filename" in params or "filename*" in params
    raise FormError("a multipart part has no Content-Disposition")


def _params(header: str) -> dict[str, str]:
    """A header's ``; key=value`` parameters, quoted strings unquoted; keys lower-case."""
    params: dict[str, str] = {}
    for key, raw in _PARAM.findall(header):
        value = raw.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        params.setdefault(key.lower(), value)
    return params
