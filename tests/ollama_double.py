"""A local HTTP test double for Ollama's native API, answering with the JSON shapes Ollama documents.

Ollama cannot be installed on the project's machines; this double lets the adapter be tested over real
HTTP. It keeps what it received so tests can check the request body (truncate, num_ctx, options).
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from ollama_fixtures import GEMMA3_270M_MODEL_INFO

MODEL = "gemma3:270m"
NUM_CTX_DEFAULT = 4096
MODEL_INFO = GEMMA3_270M_MODEL_INFO


@dataclass
class OllamaDouble:
    """Behaviour switches: `mode` picks a canned error; `send_cached_count` mimics Ollama >= v0.33."""

    mode: str = "ok"
    send_cached_count: bool = True
    received: list[dict[str, Any]] = field(default_factory=list)
    loaded_ctx: int = NUM_CTX_DEFAULT
    memory_limit_bytes: int | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/api/chat", self.chat)
        app.router.add_post("/api/generate", self.generate)
        app.router.add_get("/api/ps", self.ps)
        app.router.add_post("/api/show", self.show)
        app.router.add_get("/api/version", self.version)
        return app

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": "0.33.0"})

    async def chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.received.append(body)
        if body.get("model") != MODEL:
            return web.json_response({"error": f"model '{body.get('model')}' not found"}, status=404)
        if self.mode == "oom":
            return web.json_response(
                {"error": "llama runner process has terminated: cudaMalloc failed: out of memory"}, status=500
            )
        if self.mode == "crash":
            return web.json_response({"error": "model runner has unexpectedly stopped"}, status=500)
        if self.mode == "busy":
            return web.json_response(
                {"error": "server busy, please try again.  maximum pending requests exceeded"}, status=503
            )
        num_ctx = (body.get("options") or {}).get("num_ctx", NUM_CTX_DEFAULT)
        self.loaded_ctx = num_ctx
        prompt_tokens = sum(len(m["content"].split()) for m in body["messages"])
        if prompt_tokens > num_ctx and body.get("truncate") is False:
            return web.json_response(
                {"error": f"the input length ({prompt_tokens} tokens) exceeds the context length ({num_ctx} tokens)"},
                status=400,
            )
        num_predict = (body.get("options") or {}).get("num_predict", 8)
        words = ["ok"] * min(num_predict, 8)
        reply: dict[str, Any] = {
            "model": MODEL,
            "created_at": "2026-11-29T12:00:00.000000Z",
            "message": {"role": "assistant", "content": " ".join(words)},
            "done": True,
            "done_reason": "length" if num_predict <= 8 else "stop",
            "total_duration": 5_000_000,
            "load_duration": 1_000_000,
            "prompt_eval_count": prompt_tokens,
            "prompt_eval_duration": 2_000_000,
            "eval_count": len(words),
            "eval_duration": 2_000_000,
        }
        if self.send_cached_count:
            reply["prompt_eval_cached_count"] = max(prompt_tokens - 3, 0)
        return web.json_response(reply)

    async def generate(self, request: web.Request) -> web.Response:
        """Loads the model at `options.num_ctx` (as Ollama reloads on a new num_ctx); fails like Ollama when the
        KV cache would not fit `memory_limit_bytes`."""
        body = await request.json()
        self.received.append(body)
        num_ctx = (body.get("options") or {}).get("num_ctx", NUM_CTX_DEFAULT)
        if self.memory_limit_bytes and self.size_at(num_ctx) > self.memory_limit_bytes:
            return web.json_response(
                {"error": "model requires more system memory (1.2 GiB) than is available (1.0 GiB)"}, status=500
            )
        self.loaded_ctx = num_ctx
        prompt_tokens = len(body.get("prompt", "").split())
        return web.json_response(
            {
                "model": MODEL,
                "created_at": "2026-11-29T12:00:00Z",
                "response": "ok",
                "done": True,
                "done_reason": "stop",
                "prompt_eval_count": prompt_tokens,
                "eval_count": 1,
                "total_duration": 1000,
            }
        )

    def size_at(self, num_ctx: int) -> int:
        return 600_000_000 + 3 * 1024 * num_ctx

    async def ps(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "models": [
                    {
                        "name": MODEL,
                        "model": MODEL,
                        "size": self.size_at(self.loaded_ctx),
                        "digest": "sha256:0000",
                        "details": {
                            "format": "gguf",
                            "family": "gemma3",
                            "parameter_size": "268.10M",
                            "quantization_level": "Q4_K_M",
                        },
                        "expires_at": "2026-11-29T12:30:00.000000Z",
                        "size_vram": 0,
                        "context_length": self.loaded_ctx,
                    }
                ]
            }
        )

    async def show(self, request: web.Request) -> web.Response:
        body = await request.json()
        if body.get("model") != MODEL:
            return web.json_response({"error": f"model '{body.get('model')}' not found"}, status=404)
        return web.json_response(
            {
                "modelfile": "FROM gemma3:270m",
                "details": {"format": "gguf", "family": "gemma3"},
                "model_info": MODEL_INFO,
                "capabilities": ["completion"],
            }
        )


class RunningDouble:
    """Runs an OllamaDouble on 127.0.0.1 in a background thread; `url` is where it listens."""

    def __init__(self, double: OllamaDouble) -> None:
        self.double = double
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None

    def __enter__(self) -> RunningDouble:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    async def _start(self) -> None:
        self._runner = web.AppRunner(self.double.app())
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"

    def __exit__(self, *exc: object) -> None:
        assert self._runner is not None
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
