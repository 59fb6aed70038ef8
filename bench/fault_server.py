"""A fault-injecting OpenAI-compatible server (llama-server's dialect), for the stress test and the pool benchmark.

It answers `/v1/chat/completions` at once (or after a fixed service time per request, one request per slot at a
time), and injects, at seeded random: 503s, dropped connections, replies that are not JSON, slow replies, and
crashes (every connection dropped, nothing listening for a moment, then back on the same port). A request whose
last message holds the poison marker crashes the server every time it is sent. `GET /stats` counts what it did;
`/props` reports its slots as llama-server does, and `id_slot` is accepted (or refused, to play a server that
rejects slot ids).

Run: python bench/fault_server.py PORT [--seed N] [--p503 0.03] ... (binds 127.0.0.1 only)
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import threading
from dataclasses import dataclass, field

from aiohttp import web

POISON = "POISON-PILL"


@dataclass
class Faults:
    p503: float = 0.0
    p_drop: float = 0.0
    p_not_json: float = 0.0
    p_slow: float = 0.0
    p_crash: float = 0.0
    slow_s: float = 1.0
    down_s: float = 0.5
    down_resets: bool = False
    """While down, keep the port open and reset every connection at once (/health too), as a crashed server behind a
    proxy or a port still held by a dying process does; else nothing listens (connection refused)."""
    service_s: float = 0.0
    """Fixed time per request (each slot serves one request at a time)."""
    slots: int = 8
    refuse_slot_ids: bool = False
    refuse_marker: str | None = None
    """Requests holding this text are refused as too long (HTTP 400), as a server with a smaller context would."""
    require_key: str | None = None
    llama_server: bool = True
    """Answer /props as llama-server does (slots, context); False plays vLLM or SGLang, which say neither."""
    slow_marker: str | None = None
    """Requests holding this text are answered after `slow_s`, every time (a request the server is slow on)."""
    fail_marker: str | None = None
    """Requests holding this text get HTTP 500 every time, while the others are answered."""
    wedge_after: int | None = None
    """After this many answers, HTTP 500 to every request while /health stays ok (a wedged engine)."""
    seed: int = 1


@dataclass
class FaultServer:
    port: int
    faults: Faults = field(default_factory=Faults)
    counts: collections.Counter = field(default_factory=collections.Counter)
    bodies: list[dict] = field(default_factory=list)
    keep_bodies: bool = False

    def __post_init__(self) -> None:
        self.rng = random.Random(self.faults.seed)
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._transports: set = set()
        self._slots = asyncio.Semaphore(self.faults.slots) if self.faults.service_s else None
        self._down = False

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 2**20, middlewares=[self._refuse_while_down])
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/health", self.health)
        app.router.add_get("/props", self.props)
        app.router.add_get("/stats", self.stats)
        app.router.add_get("/v1/models", self.models)
        return app

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app(), handle_signals=False, access_log=None)
        await self._runner.setup()
        await self._listen()

    async def _listen(self) -> None:
        self._site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await self._site.start()

    async def crash(self, why: str) -> None:
        """Every connection dropped, nothing listening for `down_s`, then back on the same port."""
        if self._down:
            return
        await self.go_down()
        await asyncio.sleep(self.faults.down_s)
        await self.come_back()

    async def go_down(self) -> None:
        """Every connection dropped and nothing listening, until `come_back` (a test that needs an outage to last
        until something has happened, however slow the machine, holds it this way)."""
        self._down = True
        if not self.faults.down_resets:
            await self._site.stop()
        for transport in list(self._transports):
            transport.abort()
        # a crashed process closes every socket, idle keep-alive ones too (else /health would still answer on one)
        for handler in list(self._runner.server.connections if self._runner and self._runner.server else []):
            handler.force_close()

    async def come_back(self) -> None:
        if not self.faults.down_resets:
            await self._listen()
        self._down = False

    @web.middleware
    async def _refuse_while_down(self, request: web.Request, handler):
        """While down with `down_resets`, every connection is reset before a reply (the health check's too)."""
        if self._down:
            self.counts["reset while down"] += 1
            if request.transport is not None:  # None: the client is gone already
                request.transport.abort()
            return web.Response(status=500)  # never reaches the client
        return await handler(request)

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def props(self, request: web.Request) -> web.Response:
        if not self.faults.llama_server:
            raise web.HTTPNotFound()
        return web.json_response({"total_slots": self.faults.slots,
                                  "default_generation_settings": {"n_ctx": 8192}})  # fmt: skip

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": "fault", "object": "model"}]})

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response(dict(self.counts))

    async def chat(self, request: web.Request) -> web.StreamResponse:
        transport = request.transport
        self._transports.add(transport)
        try:
            return await self._chat(request)
        finally:
            self._transports.discard(transport)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        if self.faults.require_key and request.headers.get("Authorization") != f"Bearer {self.faults.require_key}":
            self.counts["401"] += 1
            return web.json_response({"error": {"code": 401, "message": "Invalid API Key"}}, status=401)
        body = await request.json()
        self.counts["requests"] += 1
        if self.keep_bodies:
            self.bodies.append(body)
        if "id_slot" in body and self.faults.refuse_slot_ids:
            self.counts["refused slot id"] += 1
            return web.json_response({"error": {"code": 400, "message": "Invalid slot ID"}}, status=400)
        last = body["messages"][-1]["content"]
        if self.faults.refuse_marker and self.faults.refuse_marker in str(last):
            self.counts["refused as too long"] += 1
            return web.json_response({"error": {"code": 400, "type": "exceed_context_size_error",
                                                "message": "the request exceeds the available context size"}},
                                     status=400)  # fmt: skip
        text = last if isinstance(last, str) else json.dumps(last)
        if POISON in text:
            return await self._gone(request, "poison")
        if (self.faults.fail_marker and self.faults.fail_marker in text) or (
            self.faults.wedge_after is not None and self.counts["answered"] >= self.faults.wedge_after
        ):
            self.counts["500"] += 1
            return web.json_response({"error": {"code": 500, "message": "EngineCore encountered an issue"}},
                                     status=500)  # fmt: skip
        if self.faults.slow_marker and self.faults.slow_marker in text:
            self.counts["slow"] += 1
            await asyncio.sleep(self.faults.slow_s)
        roll = self.rng.random()
        faults = self.faults
        edges = [("503", faults.p503), ("drop", faults.p_drop), ("not json", faults.p_not_json),
                 ("slow", faults.p_slow), ("crash", faults.p_crash)]  # fmt: skip
        chosen = None
        for name, share in edges:
            if roll < share:
                chosen = name
                break
            roll -= share
        if chosen == "503":
            self.counts["503"] += 1
            return web.json_response({"error": {"code": 503, "message": "Loading model"}}, status=503)
        if chosen == "drop":
            self.counts["dropped connection"] += 1
            request.transport.abort()
            return web.Response(status=500)  # never reaches the client
        if chosen == "not json":
            self.counts["not JSON"] += 1
            return web.Response(text="<html><body>502 Bad Gateway</body></html>", content_type="text/html")
        if chosen == "crash":
            return await self._gone(request, "random")
        if chosen == "slow":
            self.counts["slow"] += 1
            await asyncio.sleep(faults.slow_s)
        if self._slots is not None:
            async with self._slots:
                await asyncio.sleep(faults.service_s)
        self.counts["answered"] += 1
        prompt = sum(len(m["content"]) if isinstance(m["content"], str) else 0 for m in body["messages"]) // 4
        return web.json_response({
            "id": "chatcmpl-fault", "object": "chat.completion", "created": 0, "model": "fault",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "DECISION: hold"},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": 4, "total_tokens": prompt + 4,
                      "prompt_tokens_details": {"cached_tokens": max(prompt - 200, 0)}},
        })  # fmt: skip

    async def _gone(self, request: web.Request, why: str) -> web.Response:
        """Crash while this request is in flight: its connection (and every other) is dropped."""
        self.counts[f"crash ({why})"] += 1
        asyncio.get_running_loop().create_task(self.crash(why))
        request.transport.abort()
        await asyncio.sleep(self.faults.down_s + 1)
        return web.Response(status=500)  # never reaches the client: its connection was dropped

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


class RunningFaultServer:
    """A FaultServer in a background thread (for tests); `url` is where it listens."""

    def __init__(self, port: int, faults: Faults | None = None, *, keep_bodies: bool = False) -> None:
        self.server = FaultServer(port, faults or Faults(), keep_bodies=keep_bodies)
        self.url = f"http://127.0.0.1:{port}"
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self) -> RunningFaultServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    async def _start(self) -> None:
        self.server.__post_init__()
        await self.server.start()

    def crash(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.crash("asked"), self._loop).result(30)

    def go_down(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.go_down(), self._loop).result(30)

    def come_back(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.come_back(), self._loop).result(30)

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", type=int)
    for name in ("p503", "p_drop", "p_not_json", "p_slow", "p_crash", "slow_s", "down_s", "service_s"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(Faults(), name))
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--vllm", dest="llama_server", action="store_false",
                        help="no /props: a server that does not say how many requests it runs at once")  # fmt: skip
    args = parser.parse_args()
    faults = Faults(**{k: v for k, v in vars(args).items() if k != "port"})

    async def serve() -> None:
        server = FaultServer(args.port, faults)
        await server.start()
        print(f"fault server on http://127.0.0.1:{args.port}", flush=True)
        await asyncio.Event().wait()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
