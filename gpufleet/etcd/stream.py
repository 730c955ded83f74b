"""Reading the gateway's streaming responses (watch): newline-delimited JSON objects."""

from __future__ import annotations

from typing import Any

import aiohttp
import msgspec

from .errors import EtcdError, EtcdUnavailable
from .tls import tls_cause, tls_error


class Stream:
    """An open streaming response: newline-delimited JSON objects, without a line-length limit.

    aiohttp's own readline() refuses lines over its buffer size, and one watch response with
    many events (or big values) is a single line.
    """

    def __init__(self, endpoint: str, resp: aiohttp.ClientResponse) -> None:
        self.endpoint = endpoint
        self.first: dict[str, Any] = {}
        self._resp = resp
        self._buf = bytearray()
        self._eof = False

    def close(self) -> None:
        self._resp.close()

    async def next_json(self) -> dict[str, Any] | None:
        """The next JSON object, or None at the end of the stream."""
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0 and not self._eof:
                try:
                    chunk = await self._resp.content.readany()
                except (aiohttp.ClientError, OSError) as e:  # reset, payload cut short, TLS alert
                    if tls_cause(e) is not None:
                        raise tls_error(self.endpoint, e) from e
                    raise EtcdUnavailable(
                        f"etcd stream from {self.endpoint} broke: {type(e).__name__}: {e}", endpoint=self.endpoint
                    ) from e
                if not chunk:
                    self._eof = True
                self._buf += chunk
                continue
            if nl < 0:
                line, self._buf = bytes(self._buf), bytearray()
                if not line.strip():
                    return None
            else:
                line = bytes(self._buf[:nl])
                del self._buf[: nl + 1]
                if not line.strip():
                    continue
            try:
                obj = msgspec.json.decode(line)
            except msgspec.DecodeError:
                obj = None
            if not isinstance(obj, dict):
                raise EtcdError(f"unexpected message on etcd stream from {self.endpoint}: {line[:200]!r}")
            return obj
