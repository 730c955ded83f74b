"""Headless Chromium driven over the DevTools protocol (CDP), for the dashboard's browser test.

Debian's ``chromium`` package and aiohttp's websocket client are all it needs: no Playwright
browser download (none is reachable here). One page, three things: navigate, evaluate a
JavaScript expression, take a screenshot.
"""

from __future__ import annotations

import base64
import itertools
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
from helpers import free_port, wait_until


def chromium_binary() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class CdpError(RuntimeError):
    pass


class Browser:
    """``async with Browser(tmp) as b``: a headless Chromium with one page."""

    def __init__(self, tmp: Path, width: int = 1440, height: int = 1000) -> None:
        binary = chromium_binary()
        if binary is None:
            raise CdpError("no chromium on PATH")
        self.binary = binary
        self.tmp = tmp
        self.port = free_port()
        self.size = (width, height)
        self.proc: subprocess.Popen[bytes] | None = None
        self.http: aiohttp.ClientSession | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self._ids = itertools.count(1)

    def _launch(self) -> None:
        with (self.tmp / "chromium.log").open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    self.binary,
                    "--headless=new",
                    "--no-sandbox",  # tests run as root in containers
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--no-first-run",
                    "--no-default-browser-check",
                    f"--user-data-dir={self.tmp / 'profile'}",
                    f"--remote-debugging-port={self.port}",
                    f"--window-size={self.size[0]},{self.size[1]}",
                    "about:blank",
                ],
                stdout=log,
                stderr=log,
            )

    async def __aenter__(self) -> Browser:
        self._launch()
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        try:
            url = await wait_until(self._page_socket, timeout=30, what="chromium's DevTools endpoint")
            self.ws = await self.http.ws_connect(url, max_msg_size=0)
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self.http is not None:
            await self.http.close()
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    async def _page_socket(self) -> str | None:
        assert self.http is not None and self.proc is not None
        if self.proc.poll() is not None:
            raise CdpError(f"chromium exited ({self.proc.returncode}); see {self.tmp / 'chromium.log'}")
        try:
            async with self.http.get(f"http://127.0.0.1:{self.port}/json/list") as r:
                targets = await r.json(content_type=None)
        except aiohttp.ClientError:
            return None
        pages = [t for t in targets if t.get("type") == "page"]
        return pages[0]["webSocketDebuggerUrl"] if pages else None

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        """One CDP command; its result (events that arrive meanwhile are dropped)."""
        assert self.ws is not None
        msg_id = next(self._ids)
        await self.ws.send_str(json.dumps({"id": msg_id, "method": method, "params": params}))
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                raise CdpError(f"DevTools socket closed: {msg.type}")
            data = json.loads(msg.data)
            if data.get("id") != msg_id:
                continue
            if "error" in data:
                raise CdpError(f"{method}: {data['error']}")
            return data.get("result", {})
        raise CdpError("DevTools socket closed")

    async def goto(self, url: str) -> None:
        await self.call(
            "Emulation.setDeviceMetricsOverride",
            width=self.size[0],
            height=self.size[1],
            deviceScaleFactor=1,
            mobile=False,
        )
        await self.call("Page.navigate", url=url)
        loaded = f"location.href === {json.dumps(url)} && document.readyState === 'complete'"
        await wait_until(lambda: self.eval(loaded), timeout=15, what=f"{url} loaded")

    async def eval(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (awaited if it is a promise)."""
        res = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in res:
            raise CdpError(f"{expression[:80]}: {res['exceptionDetails'].get('text')} {res['exceptionDetails']}")
        return res["result"].get("value")

    async def screenshot(self, path: Path, full_page: bool = True) -> Path:
        params: dict[str, Any] = {"format": "png", "captureBeyondViewport": full_page}
        if full_page:
            w, h = await self.eval("[document.documentElement.scrollWidth, document.documentElement.scrollHeight]")
            params["clip"] = {"x": 0, "y": 0, "width": w, "height": h, "scale": 1}
        res = await self.call("Page.captureScreenshot", **params)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(res["data"]))
        return path
