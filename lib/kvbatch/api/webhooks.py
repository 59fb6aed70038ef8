"""Webhooks when a batch ends (`batch.completed`, `batch.failed`, `batch.cancelled`), in OpenAI's event shape and
signed the Standard Webhooks way (`webhook-id`, `webhook-timestamp`, `webhook-signature: v1,<base64 HMAC-SHA256 of
"id.timestamp.body">`; a `whsec_` secret is base64).

Delivery is at least once, through a durable outbox: the events a batch's end causes are written in the same SQLite
transaction as that state (`Store.save_batch(..., deliveries=...)`), and a courier sends every pending one with
back-off until its receiver answers 2xx or it is older than the give-up age (OpenAI retries for up to 72 hours),
across `kill -9` and restarts. Every attempt carries the same `webhook-id`, so a receiver deduplicates on it. A
receiver that is down never holds a batch up.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import time

import aiohttp

from kvbatch import defaults
from kvbatch.api.models import BatchObject, WebhookDelivery
from kvbatch.api.store import Store

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
    """The event for the end a batch reached. Its id is derived from the batch and the end, so the same end reached
    twice (a race of a cancel with the worker) is one event: the outbox keeps one row per id and receiver."""
    kind = EVENT_TYPES[batch.status]
    event_id = "evt_" + hashlib.sha256(f"{batch.id}:{kind}".encode()).hexdigest()[:24]
    return {"id": event_id, "object": "event", "created_at": int(time.time()), "type": kind,
            "data": {"id": batch.id}}  # fmt: skip


class Webhooks:
    """The outbox's two ends: which deliveries a batch's end causes (the store writes them with the state), and the
    courier that sends the pending ones."""

    def __init__(self, store: Store, url: str | None, secret: str | None, *,
                 give_up_after_s: float = defaults.WEBHOOK_GIVE_UP_S,
                 first_delay_s: float = defaults.WEBHOOK_FIRST_DELAY_S,
                 allowed_prefixes: tuple[str, ...] = ()) -> None:  # fmt: skip
        self.store = store
        self.url = url
        self.allowed_prefixes = allowed_prefixes
        """The addresses a batch's own `metadata.webhook_url` may name (the operator's; none by default)."""
        self.secret = secret
        self.give_up_after_s = give_up_after_s
        self.first_delay_s = first_delay_s
        self._wake = asyncio.Event()

    def deliveries_for(self, batch: BatchObject) -> list[WebhookDelivery]:
        """The event this batch's state causes, once per receiver (none for a state that is not an end); pass them
        to `Store.save_batch` with that state, then `wake()`."""
        if batch.status not in EVENT_TYPES:
            return []
        event, now = event_for(batch), time.time()
        body = json.dumps(event)
        return [
            WebhookDelivery(event_id=event["id"], event_type=event["type"], batch_id=batch.id, url=url, body=body,
                            created_at=now, next_at=now)
            for url in sorted(self.receivers(batch))
        ]  # fmt: skip

    def wake(self) -> None:
        """New deliveries were saved: send them now rather than at the courier's next look."""
        self._wake.set()

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

    async def forever(self) -> None:
        """Send what is due, record each attempt, sleep until the next is due or new ones are saved."""
        timeout = aiohttp.ClientTimeout(total=defaults.WEBHOOK_TIMEOUT_S)
        while True:
            self._wake.clear()
            try:
                due = await asyncio.to_thread(self.store.due_deliveries, time.time())
                if due:
                    async with aiohttp.ClientSession(timeout=timeout) as session:
                        attempted = await asyncio.gather(*(self._attempt(session, d) for d in due))
                    for delivery in attempted:
                        await asyncio.to_thread(self.store.record_attempt, delivery)
                    continue
                next_at = await asyncio.to_thread(self.store.next_delivery_at)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 (the store busy or failing: the events stay pending; look again soon)
                log.exception("webhook outbox: will look again in %.0f s", self.first_delay_s)
                next_at = time.time() + self.first_delay_s
            wait = None if next_at is None else max(next_at - time.time(), 0.0)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)

    async def _attempt(self, session: aiohttp.ClientSession, delivery: WebhookDelivery) -> WebhookDelivery:
        """One POST of the stored bytes; the delivery comes back delivered, given up, or due again after back-off."""
        body, timestamp = delivery.body.encode(), int(time.time())
        headers = {"content-type": "application/json", "webhook-id": delivery.event_id,
                   "webhook-timestamp": str(timestamp)}  # fmt: skip
        if self.secret:
            headers["webhook-signature"] = sign(self.secret, delivery.event_id, timestamp, body)
        delivery.attempts += 1
        try:
            async with session.post(delivery.url, data=body, headers=headers) as reply:
                why = None if reply.status < 300 else f"HTTP {reply.status}"
        except Exception as exc:  # noqa: BLE001 (any failure of one receiver is that delivery's, never the courier's)
            why = f"{type(exc).__name__}: {exc}"
        now = time.time()
        if why is None:
            delivery.state, delivery.ended_at, delivery.last_error = "delivered", now, None
            return delivery
        delivery.last_error = why
        if now - delivery.created_at >= self.give_up_after_s:
            delivery.state, delivery.ended_at = "given_up", now
            log.warning("webhook %s %s to %s given up after %d attempts: %s", delivery.event_type, delivery.event_id,
                        delivery.url, delivery.attempts, why)  # fmt: skip
        else:
            delay = min(self.first_delay_s * 2 ** (delivery.attempts - 1), defaults.WEBHOOK_MAX_DELAY_S)
            delivery.next_at = now + delay
            log.warning("webhook %s to %s, attempt %d: %s (again in %.0f s)", delivery.event_type, delivery.url,
                        delivery.attempts, why, delay)  # fmt: skip
        return delivery
