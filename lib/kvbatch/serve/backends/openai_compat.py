"""OpenAI-compatible chat completions (`/v1/chat/completions`): llama-server, vLLM, SGLang, LM Studio, Ollama's /v1.

On llama-server each request can be pinned to a slot (`id_slot`), so that slot's prefix cache stays warm; a server
that refuses slot ids gets requests without them from then on.
"""

from __future__ import annotations

import time
from typing import Any

from kvbatch.errors import BadRequestError, KvbatchError, MalformedReplyError
from kvbatch.serve.backends import register_backend
from kvbatch.serve.backends.base import BackendOptions, ChatResult, ServerLimits
from kvbatch.serve.backends.http import HttpBackend


def cached_tokens_from(body: dict[str, Any]) -> int | None:
    """Cached prompt tokens from `usage.prompt_tokens_details.cached_tokens`, else llama-server's `timings.cache_n`."""
    usage = body.get("usage") or {}
    details = usage.get("prompt_tokens_details") or {}
    if details.get("cached_tokens") is not None:
        return int(details["cached_tokens"])
    timings = body.get("timings") or {}
    if timings.get("cache_n") is not None:
        return int(timings["cache_n"])
    return None


def _positive_int(value: Any) -> int | None:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else None


@register_backend("openai")
class OpenAICompatBackend(HttpBackend):
    """Any server that speaks `/v1/chat/completions`."""

    unreachable_hint = "is the server running? Start the embedded one with `kvbatch serve`."

    def __init__(self, base_url: str, model: str | None = None, *, options: BackendOptions | None = None,
                 slot_pinning: bool = False) -> None:  # fmt: skip
        super().__init__(base_url.rstrip("/").removesuffix("/v1"), model, options=options)
        self.slot_pinning = slot_pinning

    async def chat(
        self, body: dict[str, Any], *, slot: int | None = None, timeout_s: float | None = None
    ) -> ChatResult:
        payload = dict(body)
        payload["stream"] = False
        if self.model and "model" not in payload:
            payload["model"] = self.model
        if slot is not None and self.slot_pinning:
            payload["id_slot"] = slot
        started = time.perf_counter()
        try:
            reply = await self.http.request("POST", "/v1/chat/completions", payload, timeout_s=timeout_s)
        except BadRequestError as exc:
            if "id_slot" not in payload or "slot" not in str(exc).lower():
                raise
            self.slot_pinning = False  # a server that refuses slot ids: let it choose, for this and every request
            payload.pop("id_slot")
            reply = await self.http.request("POST", "/v1/chat/completions", payload, timeout_s=timeout_s)
        latency_s = time.perf_counter() - started
        if not isinstance(reply, dict) or not isinstance(reply.get("choices"), list) or not reply["choices"]:
            raise MalformedReplyError(
                f"{self.base_url}/v1/chat/completions answered without choices: {str(reply)[:200]}"
            )
        choice = reply["choices"][0] if isinstance(reply["choices"][0], dict) else {}
        message = choice.get("message") or {}
        usage = reply.get("usage") or {}
        return ChatResult(
            text=message.get("content") or "",
            finish_reason=choice.get("finish_reason"),
            prompt_tokens=usage.get("prompt_tokens"),
            cached_prompt_tokens=cached_tokens_from(reply),
            completion_tokens=usage.get("completion_tokens"),
            latency_s=latency_s,
            timings=reply.get("timings") or {},
            model=reply.get("model"),
            response_body=reply,
        )

    async def health(self) -> bool:
        status = await self.http.status("/health")
        if status == 404:  # vLLM and SGLang have /health; others may only list models
            status = await self.http.status("/v1/models")
        return status == 200

    async def tokenize(self, text: str) -> list[int] | None:
        """llama-server's `/tokenize`; None where the server has none."""
        try:
            reply = await self.http.request("POST", "/tokenize", {"content": text, "add_special": False}, timeout_s=60)
        except KvbatchError:
            return None
        tokens = reply.get("tokens") if isinstance(reply, dict) else None
        return [int(t) for t in tokens] if isinstance(tokens, list) else None

    async def _get(self, path: str) -> dict[str, Any] | list[Any] | None:
        try:
            return await self.http.request("GET", path, timeout_s=10)
        except KvbatchError:
            return None

    async def limits(self) -> ServerLimits:
        """llama-server's `/props` (total slots, context per slot) and `/slots`; vLLM's `max_model_len` in
        `/v1/models`. What none of them says stays unknown and is marked assumed by the planner."""
        limits = ServerLimits()
        props = await self._get("/props")
        if isinstance(props, dict) and "default_generation_settings" in props:
            limits.server_kind = "llama-server"
            limits.slot_pinning = True
            if _positive_int(props.get("total_slots")):
                limits.slots = int(props["total_slots"])
                limits.sources["slots"] = "/props total_slots"
            n_ctx = _positive_int((props.get("default_generation_settings") or {}).get("n_ctx"))
            if n_ctx:
                limits.slot_context_tokens = n_ctx
                limits.sources["slot_context_tokens"] = "/props n_ctx"
        slots = await self._get("/slots")
        if isinstance(slots, list) and slots and all(isinstance(s, dict) for s in slots):
            limits.slots = len(slots)
            limits.sources["slots"] = "/slots"
            n_ctx = _positive_int(slots[0].get("n_ctx"))
            if n_ctx:
                limits.slot_context_tokens = n_ctx
                limits.sources["slot_context_tokens"] = "/slots n_ctx"
        models = await self._get("/v1/models")
        entries = models.get("data") if isinstance(models, dict) else None
        if isinstance(entries, list):
            chosen = next((e for e in entries if isinstance(e, dict) and e.get("id") == self.model), None)
            chosen = chosen or next((e for e in entries if isinstance(e, dict)), None) or {}
            longest = _positive_int(chosen.get("max_model_len"))
            if longest:
                limits.max_model_len = longest
                limits.sources["max_model_len"] = "/v1/models max_model_len"
                if limits.server_kind == "unknown":
                    limits.server_kind = "vLLM-compatible"
        return limits

    async def _complete(self, tokens: int, max_tokens: int, *, all_of_them: bool = False) -> dict[str, Any]:
        """llama-server's /completion on a prompt of exactly `tokens` token ids (one word repeated), uncached;
        `all_of_them`: generate `max_tokens` even past an end-of-text token."""
        word = await self.tokenize(" hello")
        if not word:
            raise KvbatchError(f"{self.base_url} cannot tokenize, so a fill request of exact length cannot be made")
        body = {"prompt": [word[-1]] * max(tokens, 1), "n_predict": max_tokens, "cache_prompt": False}
        if all_of_them:
            body["ignore_eos"] = True
        return await self.http.request("POST", "/completion", body, timeout_s=900)

    async def fill(self, tokens: int, *, context_tokens: int, max_tokens: int = 4) -> int:
        """llama-server's /completion takes token ids, so the prompt length is exact."""
        reply = await self._complete(tokens, max_tokens)
        return int((reply.get("timings") or {}).get("prompt_n") or reply.get("tokens_evaluated") or 0)

    async def speeds(self, prompt_tokens: int, answer_tokens: int) -> tuple[float | None, float | None]:
        """The server's own prompt and generation speeds (tokens/s) on one request of these sizes, from its timings:
        what a plan without a measurement estimates its time from."""
        timings = (await self._complete(prompt_tokens, answer_tokens, all_of_them=True)).get("timings") or {}
        return _positive_float(timings.get("prompt_per_second")), _positive_float(timings.get("predicted_per_second"))


def _positive_float(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and value > 0 else None
