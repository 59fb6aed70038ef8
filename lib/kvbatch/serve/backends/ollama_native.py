"""Ollama's native API (`/api/chat`, `/api/generate`, `/api/ps`, `/api/show`).

Replies are parsed with the official `ollama` package's types; requests are posted with the shared aiohttp
transport because the client's `chat()` cannot send `truncate: false`, without which Ollama silently cuts a
prompt longer than `num_ctx`. Every request carries the planned `num_ctx` (a different one makes Ollama reload the
model), `keep_alive`, `stream: false` and `truncate: false`. Tested against an emulator backed by the real
llama-server (tests/ollama_emulator.py): Ollama itself runs llama-server underneath.
"""

from __future__ import annotations

import itertools
import re
import time
from pathlib import Path
from typing import Any, ClassVar

import ollama
from pydantic import ConfigDict, ValidationError

from kvbatch import defaults
from kvbatch.errors import ContextOverflowError, FillError, KvbatchError, MalformedReplyError, classify_http_error
from kvbatch.messages import message_text
from kvbatch.serve.backends import register_backend
from kvbatch.serve.backends.base import BackendOptions, ChatResult, ServerLimits, ServerMemory
from kvbatch.serve.backends.http import HttpBackend
from kvbatch.serve.layout import SlotLayout

# OpenAI body keys that Ollama takes inside `options`, with Ollama's name for each.
OPTION_NAMES = {
    "max_tokens": "num_predict",
    "max_completion_tokens": "num_predict",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "seed": "seed",
    "stop": "stop",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "min_p": "min_p",
}
# OpenAI body keys that mean nothing to Ollama's chat and change no answer: not sent, on purpose.
IGNORED_FIELDS = {"model", "stream", "stream_options", "user", "store", "metadata", "id_slot", "n"}


class _ChatReply(ollama.ChatResponse):
    """Keeps fields newer servers add (`prompt_eval_cached_count`, from v0.33) that the client's model drops."""

    model_config = ConfigDict(extra="allow")


class _GenerateReply(ollama.GenerateResponse):
    model_config = ConfigDict(extra="allow")


FILL_WORD = " hello"
_NAMED_COUNT = re.compile(r"\((\d+) tokens\) exceeds")
"""The prompt's count, where a refusal names it: v0.30-v0.30.8 pass on llama-server's "request (N tokens) exceeds
the available context size (M tokens)". Ollama's own runner (v0.12.6-v0.24) names none: "the input length exceeds
the context length"."""
PARTIAL_PROMPT_COUNTS = ((0, 30), (0, 33))
"""Ollama versions [from, to) whose `prompt_eval_count` counted only the prompt tokens evaluated anew: v0.30 ran
llama-server underneath and passed on its `prompt_n`; v0.33 (ollama#16428) added the cached `cache_n` back."""


def parse_version(text: str | None) -> tuple[int, ...] | None:
    """ "0.31.4" -> (0, 31, 4); None for what is not a version (a development build's "0.0.0" included)."""
    parts = []
    for piece in (text or "").lstrip("v").split("."):
        digits = "".join(itertools.takewhile(str.isdigit, piece))
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts) if parts and any(parts) else None


def counts_only_uncached(version: tuple[int, ...] | None) -> bool:
    low, high = PARTIAL_PROMPT_COUNTS
    return version is not None and low <= version[:2] < high


def ollama_format(response_format: Any) -> str | dict[str, Any] | None:
    """OpenAI's `response_format` as Ollama's `format`: "json", or the JSON schema itself."""
    if not isinstance(response_format, dict):
        return None
    kind = response_format.get("type")
    if kind == "json_object":
        return "json"
    if kind == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema")
        return schema if isinstance(schema, dict) else "json"
    return None


def ollama_body(
    body: dict[str, Any], model: str, num_ctx: int | None, keep_alive: str | float | None
) -> dict[str, Any]:
    """Translate an OpenAI chat body to an `/api/chat` body; send only what was set."""
    options: dict[str, Any] = dict(body.get("options") or {})
    for openai_key, ollama_key in OPTION_NAMES.items():
        if body.get(openai_key) is not None:
            options[ollama_key] = body[openai_key]
    if num_ctx is not None:
        options["num_ctx"] = num_ctx
    messages = [{**m, "content": message_text(m) or ""} for m in body["messages"]]  # Ollama takes a string
    request: dict[str, Any] = {"model": model, "messages": messages, "stream": False, "truncate": False}
    fmt = ollama_format(body.get("response_format"))
    if fmt is not None:
        request["format"] = fmt
    if options:
        request["options"] = options
    if keep_alive is not None:
        request["keep_alive"] = keep_alive
    return request


def as_openai_completion(reply: dict[str, Any], cached: int | None) -> dict[str, Any]:
    """An Ollama chat reply as an OpenAI `chat.completion` object, so batch output is uniform."""
    prompt = reply.get("prompt_eval_count")
    completion = reply.get("eval_count")
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": (prompt or 0) + (completion or 0),
    }
    if cached is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
    return {
        "object": "chat.completion",
        "model": reply.get("model"),
        "created": int(time.time()),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": (reply.get("message") or {}).get("content", "")},
                "finish_reason": reply.get("done_reason"),
            }
        ],
        "usage": usage,
    }


@register_backend("ollama")
class OllamaBackend(HttpBackend):
    """Ollama's native API. `num_ctx` is sent with every request: changing it makes Ollama reload the model."""

    unreachable_hint = "is `ollama serve` running?"

    refused_fields: ClassVar[dict[str, str]] = {
        "tools": "tool calls are not run by a batch; remove `tools`",
        "tool_choice": "tool calls are not run by a batch; remove `tool_choice`",
        "functions": "function calls are not run by a batch; remove `functions`",
        "logit_bias": "Ollama has no logit bias",
    }
    accepted_fields: ClassVar[frozenset[str] | None] = frozenset(
        {"messages", "response_format", "options", *OPTION_NAMES, *IGNORED_FIELDS}
    )
    refused_schema_keywords: ClassVar[dict[str, str]] = {
        "$defs": "Ollama refuses `$defs` in a format schema: write the definitions inline",
        "definitions": "Ollama refuses `definitions` in a format schema: write them inline",
        "pattern": "Ollama refuses `pattern` in a format schema: remove it, or use an enum",
    }

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        *,
        options: BackendOptions | None = None,
        layout: SlotLayout | None = None,
        keep_alive: str | float | None = defaults.KEEP_ALIVE,
    ) -> None:
        super().__init__(base_url, model, options=options)
        self.layout = layout
        """The layout Ollama is asked to run: every request sends its `slot_context_tokens` as `num_ctx` (the
        supervisor gives it a new one after a back-off)."""
        self.keep_alive = keep_alive
        self._version: tuple[int, ...] | None = None
        self._version_read = False
        self.fill_tokens_per_word = 1.0
        """How many tokens this server counts for each word of a measurement's fill, from its own replies (1.0 until
        the first): recorded with the measurement."""

    async def server_version(self) -> tuple[int, ...] | None:
        """`/api/version`, read once: what its `prompt_eval_count` means depends on it."""
        if not self._version_read:
            try:
                reply = await self.http.request("GET", "/api/version", timeout_s=10)
            except KvbatchError:
                return None  # asked again next time: the server may be starting
            self._version = parse_version(reply.get("version") if isinstance(reply, dict) else None)
            self._version_read = True
        return self._version

    def _model(self, body: dict[str, Any] | None = None) -> str:
        model = self.model or (body or {}).get("model")
        if not model:
            raise KvbatchError("the Ollama backend needs a model name (--model)")
        return str(model)

    async def _post(self, path: str, payload: dict[str, Any], timeout_s: float | None) -> dict[str, Any]:
        reply = await self.http.request("POST", path, payload, timeout_s=timeout_s)
        if not isinstance(reply, dict):
            raise MalformedReplyError(f"{self.base_url}{path} answered with {type(reply).__name__}, not an object")
        if reply.get("error"):  # an error after the reply began arrives in a 200 body
            raise classify_http_error(500, str(reply["error"]), url=self.base_url + path)
        return reply

    async def chat(
        self, body: dict[str, Any], *, slot: int | None = None, timeout_s: float | None = None
    ) -> ChatResult:
        num_ctx = self.layout.slot_context_tokens if self.layout else None
        request = ollama_body(body, self._model(body), num_ctx, self.keep_alive)
        started = time.perf_counter()
        raw = await self._post("/api/chat", request, timeout_s)
        latency_s = time.perf_counter() - started
        parsed = self._parse(_ChatReply, raw, "/api/chat")
        reply = parsed.model_dump()
        cached = (parsed.model_extra or {}).get("prompt_eval_cached_count")
        cached = int(cached) if cached is not None else None
        prompt_tokens = reply.get("prompt_eval_count")
        partial = counts_only_uncached(await self.server_version())
        if partial and cached is not None and prompt_tokens is not None:
            prompt_tokens, partial = prompt_tokens + cached, False  # the whole prompt, as later versions count it
            reply["prompt_eval_count"] = prompt_tokens
        timings = {
            f"{key}_ns": reply[key]
            for key in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration")
            if reply.get(key) is not None
        }
        return ChatResult(
            text=(reply.get("message") or {}).get("content") or "",
            finish_reason=reply.get("done_reason"),
            prompt_tokens=prompt_tokens,
            cached_prompt_tokens=cached,
            completion_tokens=reply.get("eval_count"),
            latency_s=latency_s,
            timings=timings,
            model=reply.get("model"),
            response_body=as_openai_completion(reply, cached),
            prompt_tokens_exclude_cached=partial and prompt_tokens is not None,
        )

    async def generate(self, prompt: str, *, num_ctx: int, max_tokens: int) -> dict[str, Any]:
        """`/api/generate` at `num_ctx` (a new one reloads the model): how measurements load and fill."""
        payload = {
            "model": self._model(),
            "prompt": prompt,
            "raw": True,
            "stream": False,
            "truncate": False,
            "keep_alive": self.keep_alive,
            "options": {"num_ctx": num_ctx, "num_predict": max_tokens},
        }
        raw = await self._post("/api/generate", payload, 900)
        return self._parse(_GenerateReply, raw, "/api/generate").model_dump()

    async def fill(self, tokens: int, *, context_tokens: int, max_tokens: int = 4) -> int:
        """A raw prompt of `tokens` tokens as the server counts them: a word repeated, as many times as the server's
        own count says (its tokens per word, learned from its replies and carried from context to context: a
        tokenizer may count a word as two). A refusal as too long that names the count resizes from it; one that
        names none (Ollama's own runner) halves the words between the most served and the fewest refused at this
        context, whose reply then teaches the ratio. A reply more than half the guard's tolerance off is resized
        and sent again. Raises FillError when no size tried was taken (the step is then "could not fill")."""
        counted = 0
        served_words, refused_words = 0, None
        refusal: ContextOverflowError | None = None
        last_refused: ContextOverflowError | None = None
        for _ in range(defaults.FILL_ATTEMPTS):
            words = max(1, round((tokens - 1) / self.fill_tokens_per_word))  # 1: the BOS token
            if refused_words is not None and (refusal is not None or words >= refused_words):
                words = min(words, max((served_words + refused_words) // 2, 1))  # below the refusal, by halves
            try:
                reply = await self.generate(FILL_WORD * words, num_ctx=context_tokens, max_tokens=max_tokens)
            except ContextOverflowError as exc:
                if words < 2:
                    raise FillError(f"Ollama refused even a one-word fill at num_ctx {context_tokens}: {exc}") from exc
                refused_words = min(refused_words or words, words)
                named = _NAMED_COUNT.search(str(exc))
                refusal = None if named else exc
                if named:
                    self._learn_fill(int(named.group(1)), words)
                else:  # at least this many tokens per word: the words did not fit the context
                    self.fill_tokens_per_word = max(self.fill_tokens_per_word, (context_tokens - 1) / words)
                last_refused = exc
                continue
            refusal = None
            counted = int(reply.get("prompt_eval_count") or 0)
            if not counted:
                return 0  # the server does not count: nothing to size by
            self._learn_fill(counted, words)
            served_words = max(served_words, words)
            if abs(counted - tokens) <= tokens * defaults.TRUNCATION_TOLERANCE / 2 or tokens < defaults.FILL_MIN_WORDS:
                return counted
        if counted:
            return counted  # served, if not at the size asked: the caller's check says whether it filled enough
        raise FillError(f"could not fill {tokens} tokens at num_ctx {context_tokens}: each of {defaults.FILL_ATTEMPTS} "
                        f"sizes tried was refused; last: {last_refused}")  # fmt: skip

    def _learn_fill(self, counted: int, words: int) -> None:
        if words >= defaults.FILL_MIN_WORDS:  # a tiny fill is mostly BOS and template: it would say nothing
            self.fill_tokens_per_word = max(counted - 1, 1) / words

    async def health(self) -> bool:
        return await self.http.status("/api/version") == 200

    async def loaded_models(self) -> list[ServerMemory]:
        """`/api/ps`: `size`, `size_vram` and the per-slot `context_length` of each loaded model."""
        reply = self._parse(ollama.ProcessResponse, await self.http.request("GET", "/api/ps", timeout_s=10), "/api/ps")
        return [
            ServerMemory(
                model=entry.model or entry.name or "",
                size_bytes=int(entry.size or 0),
                vram_bytes=int(entry.size_vram or 0),
                context_length=entry.context_length,
            )
            for entry in reply.models
        ]

    async def loaded(self) -> ServerMemory | None:
        """This backend's model in `/api/ps`, if loaded."""
        name = self._model()
        for entry in await self.loaded_models():
            if entry.model in (name, f"{name}:latest") or entry.model.split(":")[0] == name:
                return entry
        return None

    async def _show(self) -> ollama.ShowResponse:
        reply = await self.http.request("POST", "/api/show", {"model": self._model()}, timeout_s=30)
        return self._parse(ollama.ShowResponse, reply, "/api/show")

    def _parse(self, model, reply: Any, path: str):
        """A reply in the client's typed model; one that does not fit is a malformed reply, not a traceback."""
        try:
            return model.model_validate(reply)
        except ValidationError as exc:
            raise MalformedReplyError(f"{self.base_url}{path}: unexpected reply ({exc.errors()[0]['msg']})") from exc

    async def model_info(self) -> dict[str, Any]:
        """`/api/show` `model_info`: the same architecture keys a GGUF file holds."""
        return dict((await self._show()).modelinfo or {})

    async def model_file(self) -> str | None:
        """The GGUF named by `/api/show`'s modelfile (`FROM /path`), when that file is on this machine."""
        for line in ((await self._show()).modelfile or "").splitlines():
            if line.startswith("FROM "):
                path = Path(line[5:].strip())
                if path.is_file():
                    return str(path)
        return None

    async def limits(self) -> ServerLimits:
        limits = ServerLimits(server_kind="ollama")
        info = await self.model_info()
        arch = info.get("general.architecture")
        trained = info.get(f"{arch}.context_length") if arch else None
        if isinstance(trained, int) and trained > 0:
            limits.max_model_len = trained
            limits.sources["max_model_len"] = "/api/show context_length"
        loaded = await self.loaded()
        if loaded and loaded.context_length:
            limits.slot_context_tokens = loaded.context_length
            limits.sources["slot_context_tokens"] = "/api/ps context_length"
        return limits
