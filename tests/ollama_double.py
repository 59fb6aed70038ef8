"""A small HTTP test double for Ollama's error replies only (every other behaviour is tested on the emulator, which
runs the real llama-server): each `mode` answers /api/chat with one of the error shapes Ollama documents."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from background import BackgroundApp

MODEL = "gemma3:270m"
ERRORS = {
    "oom": (500, {"error": "llama runner process has terminated: cudaMalloc failed: out of memory"}),
    "killed": (500, {"error": "llama runner process has terminated: signal: killed"}),
    "too-big": (500, {"error": "model requires more system memory (9.2 GiB) than is available (7.6 GiB)"}),
    "crash": (500, {"error": "model runner has unexpectedly stopped, this may be due to resource limitations"}),
    "busy": (503, {"error": "server busy, please try again.  maximum pending requests exceeded"}),
    "unauthorized": (401, {"error": "unauthorized"}),
    "error-in-200": (200, {"error": "an error was encountered while running the model: unexpected EOF"}),
}


@dataclass
class OllamaDouble:
    mode: str = "oom"
    received: list[dict[str, Any]] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/api/chat", self.chat)
        app.router.add_get("/api/version", self.version)
        return app

    async def version(self, _request: web.Request) -> web.Response:
        return web.json_response({"version": "0.33.0"})

    async def chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.received.append(body)
        if body.get("model") != MODEL:
            return web.json_response({"error": f"model '{body.get('model')}' not found"}, status=404)
        if self.mode == "not-json":
            return web.Response(text="<html>502 Bad Gateway</html>", status=200, content_type="text/html")
        status, payload = ERRORS[self.mode]
        return web.json_response(payload, status=status)


class RunningDouble(BackgroundApp):
    """Runs an OllamaDouble on 127.0.0.1 in a background thread; `url` is where it listens."""

    def __init__(self, double: OllamaDouble) -> None:
        super().__init__()
        self.double = double

    def make_app(self) -> web.Application:
        return self.double.app()
