"""Starting and stopping `kvbatch api`: the store, the worker that runs batches, the HTTP app, and what a restart
picks up (every batch still `validating`, `in_progress`, `finalizing` or `cancelling` goes on, in order)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import signal
from pathlib import Path

from aiohttp import web

from kvbatch import defaults
from kvbatch.api.app import make_app
from kvbatch.api.store import Store
from kvbatch.api.webhooks import Webhooks
from kvbatch.api.worker import BatchWorker
from kvbatch.batch.settings import BatchSettings
from kvbatch.errors import UserInputError


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def api_key_from(env_name: str | None, host: str) -> str | None:
    """The key clients must send, from the environment variable named by --api-key-env; none is needed on
    loopback, and binding beyond it without one is refused."""
    key = os.environ.get(env_name) if env_name else None
    if env_name and not key:
        raise UserInputError(f"--api-key-env {env_name}: that environment variable is not set (or empty)")
    if not key and not is_loopback(host):
        raise UserInputError(f"--host {host} is reachable beyond this machine: give --api-key-env NAME, the "
                             "environment variable holding the key clients must send")  # fmt: skip
    return key


async def serve(settings: BatchSettings, *, data: Path, host: str, port: int, api_key: str | None,
                webhook_url: str | None, webhook_secret: str | None, report: bool = True,
                batch_webhook_prefixes: tuple[str, ...] = (), webhook_give_up_s: float = defaults.WEBHOOK_GIVE_UP_S,
                say=print) -> None:  # fmt: skip
    store = await asyncio.to_thread(Store, data)
    webhooks = Webhooks(store, webhook_url, webhook_secret, allowed_prefixes=batch_webhook_prefixes,
                        give_up_after_s=webhook_give_up_s)  # fmt: skip
    worker = BatchWorker(store, settings, webhooks=webhooks, report=report)
    runner = web.AppRunner(make_app(store, worker, api_key=api_key), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0]
    say(f"OpenAI Batch API at http://{host}:{bound[1]}/v1", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)
    work = asyncio.create_task(worker.forever())
    courier = asyncio.create_task(webhooks.forever())  # what an earlier process left pending goes out now
    try:
        await stop.wait()
    finally:
        work.cancel()
        courier.cancel()
        await asyncio.gather(work, courier, return_exceptions=True)  # the run in progress stops, journal closed
        await runner.cleanup()
        store.close()
