"""Headless Chromium driven as a person's browser, over its DevTools protocol (a websocket, through aiohttp): it
keeps cookies between pages, fills and submits forms, follows links and redirects. `--dump-dom` cannot log in.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import shutil
import subprocess
import time
from pathlib import Path

import aiohttp
from batch_helpers import WAIT_CEILING_S


class ProtocolError(Exception):
    """Chromium answered a DevTools call with an error (during a navigation the page's context may be gone)."""


def chromium_binary() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


class Browser:
    """One headless Chromium with a profile of its own under `folder`; `async with Browser(folder) as browser`."""

    def __init__(self, folder: Path) -> None:
        binary = chromium_binary()
        assert binary, "make test installs Debian's chromium"
        self.profile = folder / "chromium-profile"
        self.profile.mkdir(parents=True, exist_ok=True)
        self._process = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--remote-debugging-port=0",
             f"--user-data-dir={self.profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self._ids = itertools.count(1)
        self._session: aiohttp.ClientSession | None = None
        self._socket: aiohttp.ClientWebSocketResponse | None = None

    async def __aenter__(self) -> Browser:
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + WAIT_CEILING_S
        while not (port_file.exists() and port_file.read_text().strip()):
            assert self._process.poll() is None, "chromium ended before it listened"
            assert time.monotonic() < deadline, "chromium never listened"
            await asyncio.sleep(0.05)
        port = port_file.read_text().split()[0]
        self._session = aiohttp.ClientSession()
        async with self._session.get(f"http://127.0.0.1:{port}/json/list") as reply:
            pages = [t for t in await reply.json() if t["type"] == "page"]
        self._socket = await self._session.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0)
        return self

    async def __aexit__(self, *exc) -> None:
        if self._socket is not None:
            await self._socket.close()
        if self._session is not None:
            await self._session.close()
        self._process.kill()
        self._process.wait()

    async def _call(self, method: str, **params) -> dict:
        assert self._socket is not None
        call_id = next(self._ids)
        await self._socket.send_str(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            message = json.loads((await self._socket.receive()).data)
            if message.get("id") == call_id:
                if "error" in message:
                    raise ProtocolError(str(message["error"]))
                return message["result"]

    async def evaluate(self, expression: str):
        """A JavaScript expression's value in the page (a promise is awaited)."""
        result = await self._call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result["result"].get("value")

    async def _new_page(self) -> str:
        """Wait until a new document (after a navigation, a redirect, a submitted form, a click) has loaded; its
        path. The old document was marked, so the wait cannot end on it."""
        deadline = time.monotonic() + WAIT_CEILING_S
        while time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            try:
                state = await self.evaluate("(window.__old ? 'old' : document.readyState) + ' ' + location.pathname")
            except ProtocolError:  # asked while the page was being replaced: ask again
                continue
            if state and state.startswith("complete "):
                return state.split(" ", 1)[1]
        raise AssertionError("the page never finished loading")

    async def open(self, url: str) -> str:
        """Go to `url`, as typed in the address bar; the path the browser ends on (after redirects)."""
        await self.evaluate("window.__old = true")
        await self._call("Page.navigate", url=url)
        return await self._new_page()

    async def act(self, script: str) -> str:
        """Run what a person does on the page (fill a form and submit it, click a link) and wait for the page it
        leads to; its path."""
        await self.evaluate(f"window.__old = true; {script}")
        return await self._new_page()

    async def text(self) -> str:
        return await self.evaluate("document.body ? document.body.innerText : ''")

    async def html(self) -> str:
        return await self.evaluate("document.documentElement.outerHTML")
