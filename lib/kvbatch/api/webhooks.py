"""Webhooks when a batch ends (`batch.completed`, `batch.failed`, `batch.cancelled`), in OpenAI's event shape and
signed the Standard Webhooks way (`webhook-id`, `webhook-timestamp`, `webhook-signature: v1,<base64 HMAC-SHA256 of
"id.timestamp.body">`; a `whsec_` secret is base64). Each delivery is retried with back-off on its own task: a
receiver that is down never holds a batch up.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import time

import aiohttp

from kvbatch import defaults
from kvbatch.api.models import BatchObject
from kvbatch.api.store import new_id

log = logging.getLogger("kvbatch.api")
EVENT_TYPES = {"completed": "batch.completed", "failed": "batch.failed", "cancelled": "batch.cancelled",
               "expired": "batch.expired"}  # fmt: skip
METADATA_KEY = "webhook_url"
"""A batch's own receiver, given in its `metadata`: called only when the operator allows its address
(`--batch-webhook-prefix`); a service several clients reach calls only receivers its operator configured."""


def secret_bytes(secret: str) -> bytes:
    return base64.b64decode(secret[len("whsec_"):]) if secret.startswith("whsec_") else secret.encode()


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    digest = hmac.new(secret_bytes(secret), f"{message_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def event_for(batch: BatchObject) -> dict:
    return {"id": new_id("evt"), "object": "event", "created_at": int(time.time()),
            "type": EVENT_TYPES[batch.status], "data": {"id": batch.id}}  # fmt: skip


class Webhooks:
    def __init__(self, url: str | None, secret: str | None, *, attempts: int = defaults.WEBHOOK_ATTEMPTS,
                 first_delay_s: float = defaults.WEBHOOK_FIRST_DELAY_S,
                 allowed_prefixes: tuple[str, ...] = ()) -> None:  # fmt: skip
        self.url = url
        self.allowed_prefixes = allowed_prefixes
        """The addresses a batch's own `metadata.webhook_url` may name (the operator's; none by default)."""
        self.secret = secret
        self.attempts = attempts
        self.first_delay_s = first_delay_s
        self._tasks: set[asyncio.Task] = set()

    def send(self, batch: BatchObject) -> None:
        """Queue the event for every receiver of this batch; returns at once."""
        if batch.status not in EVENT_TYPES:
            return
        urls = self.receivers(batch)
        event = event_for(batch)
        for url in urls:
            task = asyncio.get_running_loop().create_task(self._deliver(url, event))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def receivers(self, batch: BatchObject) -> set[str]:
        """The operator's `--webhook-url`, and the batch's own receiver only where the operator allows its address
        (a refused one is logged, never called)."""
        urls = {self.url} if self.url else set()
        own = (batch.metadata or {}).get(METADATA_KEY)
        if isinstance(own, str) and own:
            if any(own.startswith(prefix) for prefix in self.allowed_prefixes):
                urls.add(own)
            else:
                log.warning("batch %s names a webhook receiver the operator does not allow (%s): not called; allow "
                            "it with --batch-webhook-prefix", batch.id, own)  # fmt: skip
        return urls

    async def _deliver(self, url: str, event: dict) -> bool:
        body = json.dumps(event).encode()
        delay = self.first_delay_s
        timeout = aiohttp.ClientTimeout(total=defaults.WEBHOOK_TIMEOUT_S)
        for attempt in range(1, self.attempts + 1):
            timestamp = int(time.time())
            headers = {"content-type": "application/json", "webhook-id": event["id"],
                       "webhook-timestamp": str(timestamp)}  # fmt: skip
            if self.secret:
                headers["webhook-signature"] = sign(self.secret, event["id"], timestamp, body)
            try:
                async with aiohttp.ClientSession(timeout=timeout) as session, session.post(
                        url, data=body, headers=headers) as reply:  # fmt: skip
                    if reply.status < 300:
                        return True
                    why = f"HTTP {reply.status}"
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                why = f"{type(exc).__name__}: {exc}"
            log.warning("webhook %s to %s, attempt %d: %s", event["type"], url, attempt, why)
            await asyncio.sleep(delay)
            delay *= 2
        return False

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
