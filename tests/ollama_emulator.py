"""An Ollama emulator for tests, backed by the real embedded llama-server (Ollama itself runs llama-server
underneath, since v0.30.0), written from Ollama's API documentation (docs/api.md) and its runner's behaviour.

Its fidelity, endpoint by endpoint against Ollama's API documentation, is in tests/OLLAMA_EMULATOR.md.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil
from aiohttp import web
from background import BackgroundApp
from kvbatch.errors import ServerStartError
from kvbatch.measure.kvmodel import read_gguf_metadata
from kvbatch.serve.config import ServerConfig
from kvbatch.serve.server import EmbeddedServer, default_model_path

DEFAULT_NUM_CTX = 4096
GO_SIGNAL_NAMES = {
    signal.SIGKILL: "killed",
    signal.SIGSEGV: "segmentation fault",
    signal.SIGABRT: "aborted",
    signal.SIGILL: "illegal instruction",
}
"""How Go (Ollama's language) names a signal in "llama runner process has terminated: signal: killed"."""


def _gib(value: float) -> str:
    return f"{value / 2**30:.1f} GiB"


@dataclass
class OllamaEmulator:
    """Behaviour switches mirror Ollama's environment: OLLAMA_NUM_PARALLEL (`parallel`), OLLAMA_KV_CACHE_TYPE
    (`kv_cache_type`), a context cap (`context_cap`: OLLAMA_CONTEXT_LENGTH with a model that cannot go higher), the
    card (`card_bytes`: None for a CPU machine), and a memory cap that makes loads fail for real."""

    models: dict[str, Path] = field(default_factory=lambda: {"gemma3:270m": default_model_path()})
    parallel: int = 1
    kv_cache_type: str = "f16"
    context_cap: int | None = None
    card_bytes: int | None = None
    memory_cap: int | None = None
    honour_truncate: bool = True
    expose_model_path: bool = True
    max_queue: int = 64
    server_version: str = "0.33.0"
    counts_cached_prompt: bool = True
    """v0.33 and later count the whole prompt in `prompt_eval_count`; False plays v0.30-v0.32 (llama-server runner,
    before ollama#16428), which counted only the tokens evaluated anew: a prefix-cache hit looked like a cut."""
    reports_cached_count: bool = True
    """Whether replies carry `prompt_eval_cached_count` (newer servers)."""
    tokens_per_word: float = 1.0
    """Above 1 plays a tokenizer that counts a text as more tokens than words: a raw `/api/generate` prompt's words
    are served so that n words become round(n x tokens_per_word) (1.5: every other word twice), so the server's own
    count is what it evaluates."""
    refusal: str = "ollama"
    """How a prompt over num_ctx (with `truncate: false`) is refused, HTTP 400 each: "ollama", Ollama's own runner
    (v0.12.6-v0.24, runner.go `errorInputTooLong`): "the input length exceeds the context length", no counts, which
    is what users report; "llama-server", v0.30.0-v0.30.8 passing on llama-server's own message, which names them."""
    received: list[dict[str, Any]] = field(default_factory=list)
    """Every request body, in order, for tests to check what kvbatch sent."""
    loads: list[int] = field(default_factory=list)
    """num_ctx of every load, in order."""

    def __post_init__(self) -> None:
        self._runner: EmbeddedServer | None = None
        self._runner_model: str | None = None
        self._num_ctx: int | None = None
        self._expires_at = 0.0
        self._load_started = 0.0
        self._load_s = 0.0
        self._lock = asyncio.Lock()
        self._in_flight = 0
        self._session: aiohttp.ClientSession | None = None

    # ---- the runner ------------------------------------------------------------------------------------------
    @property
    def runner(self) -> EmbeddedServer | None:
        return self._runner

    def kill_runner(self, *, mid_request: bool = True, timeout_s: float = 1200.0) -> None:
        """kill -9 of the llama-server underneath, as the kernel's OOM killer would: by default while a request
        is being served (between requests Ollama would only reload, unseen). It waits for a request in flight
        however slow the machine; none within `timeout_s` is an error, never a kill nobody sees."""
        deadline = time.monotonic() + timeout_s
        while mid_request and self._in_flight == 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no request was in flight within {timeout_s:.0f} s: nothing to kill mid-request")
            time.sleep(0.01)
        if self._runner is not None:
            self._runner.kill()

    async def _ensure_loaded(self, model: str, num_ctx: int) -> None:
        wanted = min(num_ctx, self.context_cap) if self.context_cap else num_ctx
        alive = self._runner is not None and self._runner.is_running()
        if alive and self._runner_model == model and self._num_ctx == wanted:
            return
        async with self._lock:
            alive = self._runner is not None and self._runner.is_running()
            if alive and self._runner_model == model and self._num_ctx == wanted:
                return
            while self._in_flight:  # a reload waits for the requests on the old context
                await asyncio.sleep(0.05)
            await self._unload()
            config = ServerConfig(model_path=self.models[model], context_tokens=wanted * self.parallel,
                                  parallel_slots=self.parallel, cache_type_k=self.kv_cache_type,
                                  cache_type_v=self.kv_cache_type, memory_cap_bytes=self.memory_cap,
                                  flash_attention="on" if self.kv_cache_type != "f16" else "auto")  # fmt: skip
            started = time.perf_counter()
            runner = EmbeddedServer(config)
            try:
                await asyncio.to_thread(runner.start)
            except ServerStartError as exc:
                raise LoadFailed(exc) from exc
            self._load_s = time.perf_counter() - started
            self._runner, self._runner_model, self._num_ctx = runner, model, wanted
            self.loads.append(wanted)

    async def _unload(self) -> None:
        if self._runner is not None:
            await asyncio.to_thread(self._runner.stop)
        self._runner = self._runner_model = self._num_ctx = None

    def _size(self) -> int:
        if self._runner is None or self._runner.pid is None:
            return 0
        try:
            return int(psutil.Process(self._runner.pid).memory_info().rss)
        except psutil.NoSuchProcess:
            return 0

    async def _runner_call(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        runner = self._runner
        assert runner is not None
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))  # Ollama sets none
        try:
            async with self._session.post(
                runner.url + path, json=payload, headers={"Authorization": f"Bearer {runner.api_key}"}
            ) as reply:
                body = await reply.json(content_type=None)
                if reply.status >= 400:
                    raise RunnerError(reply.status, (body.get("error") or {}).get("message", str(body)))
                return body
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            code = runner.wait_exit(2.0)
            name = GO_SIGNAL_NAMES.get(-code, signal.Signals(-code).name) if code and code < 0 else f"exit {code}"
            self._runner = None
            raise RunnerError(500, f"llama runner process has terminated: signal: {name}") from exc

    # ---- HTTP ------------------------------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 2**20)
        app.router.add_get("/", self.root)
        app.router.add_get("/api/version", self.version)
        app.router.add_get("/api/tags", self.tags)
        app.router.add_post("/api/show", self.show)
        app.router.add_get("/api/ps", self.ps)
        app.router.add_post("/api/chat", self.chat)
        app.router.add_post("/api/generate", self.generate)
        app.on_cleanup.append(self._cleanup)
        return app

    async def _cleanup(self, _app) -> None:
        await self._unload()
        if self._session is not None:
            await self._session.close()

    async def root(self, _request: web.Request) -> web.Response:
        return web.Response(text="Ollama is running")

    async def version(self, _request: web.Request) -> web.Response:
        return web.json_response({"version": self.server_version})

    def _unknown(self, model: str | None) -> web.Response | None:
        if model not in self.models:
            return web.json_response({"error": f"model '{model}' not found"}, status=404)
        return None

    async def tags(self, _request: web.Request) -> web.Response:
        return web.json_response({"models": [
            {"name": name, "model": name, "size": path.stat().st_size, "digest": "sha256:" + "0" * 64,
             "details": {"format": "gguf", "family": "gemma3"}} for name, path in self.models.items()
        ]})  # fmt: skip

    async def show(self, request: web.Request) -> web.Response:
        body = await request.json()
        model = body.get("model") or body.get("name")
        if (missing := self._unknown(model)) is not None:
            return missing
        path = self.models[model]
        info = read_gguf_metadata(path)
        source = str(path) if self.expose_model_path else "/usr/share/ollama/.ollama/models/blobs/sha256-0000"
        return web.json_response({
            "modelfile": f"FROM {source}\nTEMPLATE {{{{ .Prompt }}}}",
            "parameters": "", "template": "{{ .Prompt }}",
            "details": {"format": "gguf", "family": info.get("general.architecture")},
            "model_info": {k: v for k, v in info.items() if not isinstance(v, list)},
            "capabilities": ["completion"],
        })  # fmt: skip

    async def ps(self, _request: web.Request) -> web.Response:
        if self._runner is None or time.time() > self._expires_at:
            return web.json_response({"models": []})
        size = self._size()
        vram = min(size, self.card_bytes) if self.card_bytes else 0
        expires = dt.datetime.fromtimestamp(self._expires_at, dt.timezone.utc).isoformat()
        return web.json_response({"models": [{
            "name": self._runner_model, "model": self._runner_model, "size": size, "size_vram": vram,
            "digest": "sha256:" + "0" * 64, "details": {"format": "gguf", "family": "gemma3"},
            "expires_at": expires, "context_length": self._num_ctx,
        }]})  # fmt: skip

    def _keep_alive(self, value: Any) -> None:
        seconds = 300.0
        if isinstance(value, (int, float)):
            seconds = float(value)
        elif isinstance(value, str) and value[:-1].replace(".", "").isdigit():
            seconds = float(value[:-1]) * {"s": 1, "m": 60, "h": 3600}.get(value[-1], 1)
        self._expires_at = time.time() + (seconds if seconds >= 0 else 10**9)

    async def _admit(self, body: dict[str, Any]) -> web.Response | None:
        self.received.append(body)
        if (missing := self._unknown(body.get("model"))) is not None:
            return missing
        if self._in_flight >= self.parallel + self.max_queue:
            return web.json_response({"error": "server busy, please try again.  maximum pending requests exceeded"},
                                     status=503)  # fmt: skip
        return None

    async def _serve(self, body: dict[str, Any], run) -> web.StreamResponse:
        options = body.get("options") or {}
        try:
            await self._ensure_loaded(body["model"], int(options.get("num_ctx") or DEFAULT_NUM_CTX))
        except LoadFailed as exc:
            needed = self.memory_cap or 0
            return web.json_response(
                {
                    "error": f"model requires more system memory ({_gib(needed * 1.2)}) than is "
                    f"available ({_gib(needed)}): {exc.cause.failure_line}"
                },
                status=500,
            )
        self._keep_alive(body.get("keep_alive"))
        self._in_flight += 1
        try:
            reply = await run(options)
        except RunnerError as exc:
            return web.json_response({"error": exc.message}, status=exc.status)
        finally:
            self._in_flight -= 1
        if reply.status == 200 and body.get("stream", True):
            return reply.stream_of(body)
        return reply.response

    def _as_tokenized(self, words: list[str]) -> list[str]:
        """Each word repeated so that the first n words count round(n x tokens_per_word) tokens."""
        out: list[str] = []
        for i, word in enumerate(words):
            out.extend([word] * (round((i + 1) * self.tokens_per_word) - round(i * self.tokens_per_word)))
        return out

    def _too_long(self, count: int) -> Reply:
        if self.refusal == "llama-server":
            return Reply.error(400, f"request ({count} tokens) exceeds the available context size ({self._num_ctx} "
                                    "tokens), try increasing it")  # fmt: skip
        return Reply.error(400, "the input length exceeds the context length")

    async def _count(self, messages: list[dict[str, Any]]) -> int:
        prompt = (await self._runner_call("/apply-template", {"messages": messages}))["prompt"]
        return len((await self._runner_call("/tokenize", {"content": prompt, "add_special": True}))["tokens"])

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if (refused := await self._admit(body)) is not None:
            return refused
        messages = [{"role": m["role"], "content": m.get("content", "")} for m in body.get("messages", [])]

        async def run(options: dict[str, Any]) -> Reply:
            count = await self._count(messages)
            if count > self._num_ctx:
                if body.get("truncate") is False and self.honour_truncate:
                    return self._too_long(count)
                keep = max(self._num_ctx // 2, 16) / count
                last = messages[-1]["content"]
                messages[-1] = {**messages[-1], "content": last[: int(len(last) * keep)]}
            payload = {
                "messages": messages,
                "max_tokens": options.get("num_predict", -1),
                "temperature": options.get("temperature", 0.8),
                "cache_prompt": True,
            }
            for key in ("seed", "stop", "top_p", "top_k"):
                if key in options:
                    payload[key] = options[key]
            if body.get("format") == "json":
                payload["response_format"] = {"type": "json_object"}
            started = time.perf_counter_ns()
            answer = await self._runner_call("/v1/chat/completions", payload)
            return Reply.done(self, body, answer, started, chat=True)

        return await self._serve(body, run)

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if (refused := await self._admit(body)) is not None:
            return refused

        async def run(options: dict[str, Any]) -> Reply:
            prompt = body.get("prompt", "")
            if self.tokens_per_word != 1.0 and body.get("raw"):
                prompt = " ".join(self._as_tokenized(prompt.split()))
            if prompt:
                count = len((await self._runner_call("/tokenize", {"content": prompt, "add_special": True}))["tokens"])
                if count > self._num_ctx and body.get("truncate") is False and self.honour_truncate:
                    return self._too_long(count)
            started = time.perf_counter_ns()
            answer = await self._runner_call(
                "/completion",
                {"prompt": prompt or " ", "cache_prompt": False, "n_predict": options.get("num_predict", -1)},
            )
            return Reply.done(self, body, answer, started, chat=False)

        return await self._serve(body, run)


class LoadFailed(Exception):
    def __init__(self, cause: ServerStartError) -> None:
        super().__init__(str(cause))
        self.cause = cause


class RunnerError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Reply:
    status: int
    payload: dict[str, Any]

    @property
    def response(self) -> web.Response:
        return web.json_response(self.payload, status=self.status)

    @classmethod
    def error(cls, status: int, message: str) -> Reply:
        return cls(status, {"error": message})

    @classmethod
    def done(cls, emulator: OllamaEmulator, body: dict[str, Any], answer: dict[str, Any], started_ns: int,
             *, chat: bool) -> Reply:  # fmt: skip
        if chat:
            text = answer["choices"][0]["message"]["content"]
            finish = answer["choices"][0].get("finish_reason")
            timings = answer.get("timings") or {}
        else:
            text, finish, timings = answer.get("content", ""), answer.get("stop_type"), answer.get("timings") or {}
            finish = "length" if finish == "limit" else "stop"
        prompt_n, cached = int(timings.get("prompt_n", 0)), int(timings.get("cache_n", 0))
        payload: dict[str, Any] = {
            "model": body["model"],
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
            "done": True,
            "done_reason": finish,
            "total_duration": time.perf_counter_ns() - started_ns,
            "load_duration": int(emulator._load_s * 1e9),
            "prompt_eval_count": prompt_n + cached if emulator.counts_cached_prompt else prompt_n,
            "prompt_eval_duration": int(float(timings.get("prompt_ms", 0)) * 1e6),
            "eval_count": int(timings.get("predicted_n", 0)),
            "eval_duration": int(float(timings.get("predicted_ms", 0)) * 1e6),
        }
        if emulator.reports_cached_count:
            payload["prompt_eval_cached_count"] = cached
        if chat:
            payload["message"] = {"role": "assistant", "content": text}
        else:
            payload["response"] = text
        return cls(200, payload)

    def stream_of(self, body: dict[str, Any]) -> web.Response:
        """Ollama streams NDJSON: pieces of the answer, then a final object with the counts."""
        key = "message" if "message" in self.payload else "response"
        text = self.payload["message"]["content"] if key == "message" else self.payload["response"]
        half = len(text) // 2
        lines = []
        for piece in (text[:half], text[half:]):
            chunk = {"model": body["model"], "created_at": self.payload["created_at"], "done": False}
            chunk[key] = {"role": "assistant", "content": piece} if key == "message" else piece
            lines.append(json.dumps(chunk))
        final = dict(self.payload)
        final[key] = {"role": "assistant", "content": ""} if key == "message" else ""
        lines.append(json.dumps(final))
        return web.Response(text="\n".join(lines) + "\n", content_type="application/x-ndjson")


class RunningEmulator(BackgroundApp):
    """Runs an OllamaEmulator on 127.0.0.1 in a background thread; `url` is where it listens."""

    def __init__(self, emulator: OllamaEmulator) -> None:
        super().__init__()
        self.emulator = emulator

    def make_app(self) -> web.Application:
        self.emulator.__post_init__()  # its lock belongs to this loop
        return self.emulator.app()


def main() -> None:
    """Run the emulator alone, to try kvbatch's Ollama path on a machine without Ollama (127.0.0.1 only; Ctrl-C
    stops it): `.venv/bin/python tests/ollama_emulator.py 11434 [--parallel 4] [--card-mib 700] [--tokens-per-word
    1.5] [--refusal ollama|llama-server]`."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("port", type=int, nargs="?", default=11434)
    parser.add_argument("--parallel", type=int, default=1, help="OLLAMA_NUM_PARALLEL")
    parser.add_argument("--kv-cache-type", default="f16", help="OLLAMA_KV_CACHE_TYPE")
    parser.add_argument("--card-mib", type=float, default=None, help="a GPU of this size (default: a CPU machine)")
    parser.add_argument("--tokens-per-word", type=float, default=1.0, help="the tokenizer's count of ' hello'")
    parser.add_argument("--refusal", default="ollama", choices=("ollama", "llama-server"))
    args = parser.parse_args()
    emulator = OllamaEmulator(parallel=args.parallel, kv_cache_type=args.kv_cache_type,
                              card_bytes=int(args.card_mib * 2**20) if args.card_mib else None,
                              tokens_per_word=args.tokens_per_word, refusal=args.refusal)  # fmt: skip

    async def serve() -> None:
        runner = web.AppRunner(emulator.app())
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", args.port).start()
        print(f"Ollama emulator on http://127.0.0.1:{args.port} (models: {', '.join(emulator.models)})", flush=True)
        await asyncio.Event().wait()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
