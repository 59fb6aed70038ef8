"""The one HTTP transport the backends share: an aiohttp session, and the turning of transport failures and error
replies into kvbatch errors (through `classify_http_error`, so every backend agrees on what a reply means).

aiohttp, because measured against an instant local server it sustained ~7,900 req/s at 8-32 in flight where
httpx managed 440-690; a GPU server can answer short requests faster than httpx sends them.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from kvbatch import jsoncodec
from kvbatch.errors import (
    ConnectionDroppedError,
    KvbatchError,
    MalformedReplyError,
    RequestTimeoutError,
    ServerUnreachableError,
    UserInputError,
    classify_http_error,
)
from kvbatch.serve.backends.base import Backend, BackendOptions


def server_error_message(payload: Any, fallback: str) -> str:
    """The human message inside an error body, whichever of the common shapes the server used."""
    if isinstance(payload, dict):
        error = payload.get("error", payload.get("message", payload.get("detail")))
        if isinstance(error, dict):
            return str(error.get("message") or error)
        if error is not None:
            return str(error)
    return fallback


class HttpClient:
    """One session per backend, bounded by `max_connections`; created lazily inside the running loop."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None,
        credentials: tuple[str, str] | None,
        options: BackendOptions,
        unreachable_hint: str = "is the server running?",
    ) -> None:
        if api_key and credentials:
            raise UserInputError(
                f"{base_url}: give the server's credentials one way, in the URL (user:password@) or as an API key "
                "(KVBATCH_API_KEY), not both: one Authorization header carries one of them"
            )
        self.base_url = base_url
        self._api_key = api_key
        self._auth = aiohttp.BasicAuth(*credentials) if credentials else None
        self._options = options
        """The backend's own options: its request timeout and connection bound (held there, not copied)."""
        self._hint = unreachable_hint
        self._session: aiohttp.ClientSession | None = None
        self._timeouts: dict[float, aiohttp.ClientTimeout] = {}

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            headers = {"Content-Type": "application/json"}
            if self._api_key:
                headers["Authorization"] = f"Bearer {self._api_key}"
            limit = self._options.max_connections
            connector = aiohttp.TCPConnector(limit=limit, limit_per_host=limit)
            self._session = aiohttp.ClientSession(connector=connector, headers=headers, auth=self._auth)
        return self._session

    def gone(self, exc: BaseException, path: str, timeout_s: float) -> KvbatchError:
        """A transport failure as the error the failure policy tells apart: nothing listening (the server was
        down before the request), no reply in time (it may be up and slow), or a connection dropped mid-way."""
        if isinstance(exc, asyncio.TimeoutError):
            return RequestTimeoutError(f"{self.base_url}{path} timed out after {timeout_s:g} s (--request-timeout)",
                                       details={"timeout_s": timeout_s})  # fmt: skip
        if isinstance(exc, aiohttp.ClientConnectorError):
            return ServerUnreachableError(f"cannot reach {self.base_url}{path} ({exc}); {self._hint}")
        return ConnectionDroppedError(f"{self.base_url}{path} dropped the connection ({type(exc).__name__}: {exc})")

    async def request(
        self, method: str, path: str, payload: dict[str, Any] | None = None, *, timeout_s: float | None = None
    ) -> Any:
        """The decoded JSON reply; a kvbatch error for a transport failure, an error status or a body that is not
        JSON (which is transient: a proxy's page or a reply cut off)."""
        limit_s = timeout_s or self._options.request_timeout_s
        timeout = self._timeouts.get(limit_s) or self._timeouts.setdefault(limit_s, aiohttp.ClientTimeout(limit_s))
        data = jsoncodec.dumps(payload) if payload is not None else None  # the session sends it as JSON
        try:
            async with self.session().request(method, self.base_url + path, data=data, timeout=timeout) as reply:
                raw = await reply.read()
                status = reply.status
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError) as exc:
            raise self.gone(exc, path, limit_s) from exc
        try:
            decoded = jsoncodec.loads(raw) if raw else None
        except (ValueError, RecursionError):  # not JSON, or a stray byte that is not UTF-8
            decoded = None
        if status < 400 and decoded is not None:
            return decoded
        text = raw.decode("utf-8", "replace")
        if decoded is None and text:
            try:
                decoded = jsoncodec.loads(text)
            except (ValueError, RecursionError):
                decoded = None
        if status >= 400:
            raise classify_http_error(status, server_error_message(decoded, text[:500]), url=self.base_url + path)
        if decoded is None:
            raise MalformedReplyError(
                f"{self.base_url}{path} answered HTTP {status} with a body that is not JSON: {text[:200]!r}",
                status_code=status,
            )
        return decoded

    async def status(self, path: str, *, timeout_s: float = 5.0) -> int | None:
        """The HTTP status of a GET, or None when nothing answers."""
        try:
            timeout = aiohttp.ClientTimeout(total=timeout_s)
            async with self.session().get(self.base_url + path, timeout=timeout) as reply:
                await reply.read()
                return reply.status
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return None

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None


class HttpBackend(Backend):
    """A backend that reaches its server over HTTP through one shared `HttpClient`."""

    unreachable_hint = "is the server running?"

    def __init__(self, base_url: str, model: str | None = None, *, options: BackendOptions | None = None) -> None:
        super().__init__(base_url, model, options=options)
        self.http = HttpClient(self.base_url, api_key=self.api_key, credentials=self._credentials,
                               options=self.options, unreachable_hint=self.unreachable_hint)  # fmt: skip

    async def aclose(self) -> None:
        await self.http.close()
