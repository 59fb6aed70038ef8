"""A local aiohttp app served from a background event loop, for the test servers (Ollama's emulator and double)."""

from __future__ import annotations

from aiohttp import web
from kvbatch.aio import LoopThread


class BackgroundApp:
    """Serves `make_app()` on 127.0.0.1 (a free port) while in a `with` block; `url` is where it listens."""

    def __init__(self) -> None:
        self.url = ""
        self._loop = LoopThread()
        self._runner: web.AppRunner | None = None

    def make_app(self) -> web.Application:
        raise NotImplementedError

    async def _start(self) -> None:
        self._runner = web.AppRunner(self.make_app())
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    def __enter__(self):
        self._loop.call(self._start(), 60)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._runner is not None
        self._loop.call(self._runner.cleanup(), 60)
        self._loop.close()


class OpenAIDouble(BackgroundApp):
    """The routes every OpenAI-compatible test server shares (`/v1/models`, `/health`); `chat` is the subclass's."""

    model = "double"

    def make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        return app

    async def chat(self, request: web.Request) -> web.Response:
        raise NotImplementedError

    async def models(self, _: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.model, "object": "model"}]})

    async def health(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})
