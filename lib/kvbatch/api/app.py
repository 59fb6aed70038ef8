"""`kvbatch api`: the OpenAI Batch API over HTTP (aiohttp), in the shapes the official `openai` SDK calls, so that
code written for OpenAI's batches runs on a local server by changing `base_url`.

Files: POST/GET /v1/files, GET/DELETE /v1/files/{id}, GET /v1/files/{id}/content. Batches: POST/GET /v1/batches,
GET /v1/batches/{id}, POST /v1/batches/{id}/cancel. Errors as OpenAI's `{"error": {message, type, param, code}}`.
A status page at `/`, the batches' reports under `/reports/`; where the service has a key, a browser logs in once
at `/login` (an HttpOnly cookie, good for reading only) and the API itself keeps `Authorization: Bearer`.
Uploads stream to disk in 1 MiB pieces.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import os
import time
from pathlib import Path

from aiohttp import web

from kvbatch import defaults
from kvbatch.api.models import ENDED_STATES, BatchObject, error_body
from kvbatch.api.page import login_page, status_page
from kvbatch.api.store import Store, new_id
from kvbatch.api.worker import BatchWorker

SUPPORTED_ENDPOINTS = ("/v1/chat/completions",)
_STORE = web.AppKey("store", Store)
_WORKER = web.AppKey("worker", BatchWorker)
_KEY = web.AppKey("api_key", str)


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def response(self) -> web.Response:
        return web.json_response(error_body(str(self), self.kind, param=self.param, code=self.code),
                                 status=self.status)  # fmt: skip


SESSION_COOKIE = "kvbatch_session"


def _session_token(key: str) -> str:
    """The cookie's value: derived from the key (a restart keeps a person logged in; a new key logs everyone out),
    never the key itself."""
    return hmac.new(key.encode(), b"kvbatch status page session", hashlib.sha256).hexdigest()


def _authorized(request: web.Request, key: str) -> bool:
    """The API's clients send `Authorization: Bearer <key>`; a browser sends the login's cookie, which is good for
    reading only (GET), so a page of another site cannot make it change anything."""
    given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
    if given:
        return hmac.compare_digest(given.encode(), key.encode())
    cookie = request.cookies.get(SESSION_COOKIE, "")
    return bool(cookie) and request.method in ("GET", "HEAD") and hmac.compare_digest(
        cookie.encode(), _session_token(key).encode())  # fmt: skip


@web.middleware
async def _errors_and_auth(request: web.Request, handler):
    key = request.app[_KEY]
    if key and request.path not in ("/login", "/logout") and not _authorized(request, key):
        if request.method == "GET" and (request.path == "/" or request.path.startswith(("/reports/", "/batches/"))):
            raise web.HTTPSeeOther("/login")  # a person's browser: to the form, not a 401 in JSON
        return ApiError(401, "Incorrect API key provided. Send it as `Authorization: Bearer <key>`.",
                        code="invalid_api_key").response()  # fmt: skip
    try:
        return await handler(request)
    except ApiError as exc:
        return exc.response()
    except web.HTTPNotFound:
        return ApiError(404, f"Unknown request URL: {request.method} {request.path}.", code="unknown_url").response()
    except web.HTTPMethodNotAllowed:
        return ApiError(405, f"{request.method} is not allowed on {request.path}.").response()


async def login_form(request: web.Request) -> web.Response:
    if not request.app[_KEY]:
        raise web.HTTPSeeOther("/")
    return web.Response(text=login_page(), content_type="text/html")


def _same_origin(request: web.Request) -> None:
    """A form posted from another site (its Origin names it) is refused: no other page logs a person in or out."""
    origin = request.headers.get("Origin")
    if origin and origin != f"{request.scheme}://{request.host}":
        raise ApiError(403, "This form must be sent from this service's own page.", code="cross_origin")


async def login(request: web.Request) -> web.Response:
    """The key from the form: right, and the browser gets the session cookie (HttpOnly: no script reads it;
    SameSite=Lax: another site's form cannot send it) and goes to the page; wrong, and the form again."""
    _same_origin(request)
    key = request.app[_KEY]
    given = str((await request.post()).get("key", ""))
    if not key:
        raise web.HTTPSeeOther("/")
    if not hmac.compare_digest(given.encode(), key.encode()):
        return web.Response(text=login_page(refused=True), content_type="text/html", status=401)
    response = web.HTTPSeeOther("/")
    response.set_cookie(SESSION_COOKIE, _session_token(key), httponly=True, samesite="Lax", path="/",
                        secure=request.secure)  # fmt: skip
    raise response


async def logout(request: web.Request) -> web.Response:
    _same_origin(request)
    response = web.HTTPSeeOther("/login")
    response.del_cookie(SESSION_COOKIE, path="/")
    raise response


def _store(request: web.Request) -> Store:
    return request.app[_STORE]


def _page(items: list, has_more: bool) -> dict:
    data = [item.model_dump() for item in items]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": has_more}  # fmt: skip


async def upload_file(request: web.Request) -> web.Response:
    store = _store(request)
    if not request.content_type.startswith("multipart/"):
        raise ApiError(400, "Send the file as multipart/form-data with `file` and `purpose`.")
    reader = await request.multipart()
    purpose, saved = None, None
    file_id = new_id("file")
    try:
        while (part := await reader.next()) is not None:
            if part.name == "purpose":
                purpose = (await part.text()).strip()
            elif part.name == "file":
                saved = await _stream_to_disk(part, store.files_dir / file_id)
        if saved is None:
            raise ApiError(400, "Missing required parameter: 'file'.", param="file")
        if purpose != "batch":
            raise ApiError(400, f"purpose must be 'batch' (got {purpose!r}).", param="purpose")
    except ApiError:
        with contextlib.suppress(OSError):
            (store.files_dir / file_id).unlink()
        raise
    filename, size = saved
    record = await asyncio.to_thread(store.add_file, file_id, filename, purpose, size, store.files_dir / file_id)
    return web.json_response(record.model_dump())


async def _stream_to_disk(part, path: Path) -> tuple[str, int]:
    """The upload, a piece at a time: a 2 GiB, 170,000-line file never sits in memory."""
    size = 0
    temp = path.with_suffix(".part")
    with open(temp, "wb") as handle:
        while chunk := await part.read_chunk(1 << 20):
            await asyncio.to_thread(handle.write, chunk)
            size += len(chunk)
        await asyncio.to_thread(os.fsync, handle.fileno())
    os.replace(temp, path)
    return part.filename or "upload.jsonl", size


async def list_files(request: web.Request) -> web.Response:
    """OpenAI's `GET /v1/files`: `purpose`, `limit` (1-10,000, default 10,000), `order` (desc, asc), `after`."""
    limit = _limit(request, default=10_000, most=10_000)
    order = request.query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise ApiError(400, "order must be asc or desc.", param="order")
    page, more = await asyncio.to_thread(_store(request).files, request.query.get("purpose"), limit=limit,
                                         after=request.query.get("after"), order=order)  # fmt: skip
    return web.json_response(_page(page, more))


def _limit(request: web.Request, *, default: int, most: int) -> int:
    try:
        limit = int(request.query.get("limit", str(default)))
    except ValueError as exc:
        raise ApiError(400, f"limit must be a whole number from 1 to {most}.", param="limit") from exc
    return min(max(limit, 1), most)


async def _file_or_404(request: web.Request):
    found = await asyncio.to_thread(_store(request).file, request.match_info["file_id"])
    if found is None:
        raise ApiError(404, f"No such File object: {request.match_info['file_id']}", param="id")
    return found


async def get_file(request: web.Request) -> web.Response:
    record, _ = await _file_or_404(request)
    return web.json_response(record.model_dump())


async def file_content(request: web.Request) -> web.StreamResponse:
    _, path = await _file_or_404(request)
    return web.FileResponse(path, headers={"Content-Type": "application/jsonl"})


async def delete_file(request: web.Request) -> web.Response:
    record, path = await _file_or_404(request)
    store = _store(request)
    user = await asyncio.to_thread(store.live_batch_using, record.id)
    if user is not None:
        raise ApiError(409, f"File {record.id} is the input of batch {user}, which has not ended; cancel it first.",
                       code="file_in_use")  # fmt: skip
    await asyncio.to_thread(store.delete_file, record.id)
    if path.parent == store.files_dir:  # an output file is the batch's journal: it stays with its run folder
        with contextlib.suppress(OSError):
            path.unlink()
    return web.json_response({"id": record.id, "object": "file", "deleted": True})


async def create_batch(request: web.Request) -> web.Response:
    try:
        given = await request.json()
    except ValueError as exc:
        raise ApiError(400, "The body must be JSON.") from exc
    if not isinstance(given, dict):
        raise ApiError(400, "The body must be a JSON object.")
    for name in ("input_file_id", "endpoint", "completion_window"):
        if not isinstance(given.get(name), str) or not given[name]:
            raise ApiError(400, f"Missing required parameter: '{name}'.", param=name)
    if given["endpoint"] not in SUPPORTED_ENDPOINTS:
        raise ApiError(400, f"endpoint must be one of {', '.join(SUPPORTED_ENDPOINTS)}.", param="endpoint")
    metadata = given.get("metadata")
    if metadata is not None and (not isinstance(metadata, dict) or
                                 not all(isinstance(v, str) for v in metadata.values())):  # fmt: skip
        raise ApiError(400, "metadata must map strings to strings.", param="metadata")
    store = _store(request)
    found = await asyncio.to_thread(store.file, given["input_file_id"])
    if found is None or found[0].purpose != "batch":
        raise ApiError(400, f"Invalid input_file_id: {given['input_file_id']}", param="input_file_id")
    batch = BatchObject(id=new_id("batch"), endpoint=given["endpoint"], input_file_id=given["input_file_id"],
                        completion_window=given["completion_window"], status="validating",
                        created_at=int(time.time()), metadata=metadata)  # fmt: skip
    await asyncio.to_thread(store.add_batch, batch)
    request.app[_WORKER].wake.set()
    return web.json_response(batch.model_dump())


async def list_batches(request: web.Request) -> web.Response:
    limit = _limit(request, default=20, most=100)
    page, more = await asyncio.to_thread(_store(request).batches, limit=limit, after=request.query.get("after"))
    return web.json_response(_page(page, more))


async def _batch_or_404(request: web.Request) -> BatchObject:
    batch = await asyncio.to_thread(_store(request).batch, request.match_info["batch_id"])
    if batch is None:
        raise ApiError(404, f"No batch found with id '{request.match_info['batch_id']}'.", param="batch_id")
    return batch


async def get_batch(request: web.Request) -> web.Response:
    return web.json_response((await _batch_or_404(request)).model_dump())


async def cancel_batch(request: web.Request) -> web.Response:
    batch = await _batch_or_404(request)
    worker = request.app[_WORKER]
    if batch.status in (*ENDED_STATES, "finalizing"):
        raise ApiError(409, f"Cannot cancel a batch with status '{batch.status}'.", code="batch_not_cancellable")
    now = int(time.time())
    if batch.status == "validating" and worker.running_id != batch.id and not batch.request_counts.total:
        batch.status, batch.cancelling_at, batch.cancelled_at = "cancelled", now, now  # waiting: it ends at once
    elif batch.status != "cancelling":
        batch.status, batch.cancelling_at = "cancelling", now
    webhooks = worker.webhooks
    deliveries = webhooks.deliveries_for(batch) if webhooks is not None else []
    saved = await asyncio.to_thread(functools.partial(_store(request).save_batch, batch, deliveries=deliveries,
                                                      refuse_from=(*ENDED_STATES, "finalizing")))  # fmt: skip
    if not saved:  # it reached its end (or finalizing) since it was read
        now_stored = await _batch_or_404(request)
        raise ApiError(409, f"Cannot cancel a batch with status '{now_stored.status}'.", code="batch_not_cancellable")
    worker.cancel(batch.id)
    if deliveries and webhooks is not None:
        webhooks.wake()
    return web.json_response(batch.model_dump())


async def index(request: web.Request) -> web.Response:
    page, _ = await asyncio.to_thread(_store(request).batches, limit=100)
    deliveries = await asyncio.to_thread(_store(request).deliveries, defaults.API_PAGE_DELIVERIES)
    counts = await asyncio.to_thread(_store(request).delivery_counts)
    keyed = bool(request.app[_KEY])
    return web.Response(text=status_page(page, deliveries=deliveries, delivery_counts=counts, keyed=keyed),
                        content_type="text/html")  # fmt: skip


async def report(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    path = defaults.REPORTS_DIR / name
    if "/" in name or not name.endswith(".html") or not path.is_file():
        raise ApiError(404, f"No report {name!r}.")
    return web.FileResponse(path)


async def report_so_far(request: web.Request) -> web.StreamResponse:
    """A batch's run report as of now (rendered on demand while it runs; its final report once it has one)."""
    batch = await _batch_or_404(request)
    name = batch.x_kvbatch.get("report")
    if not name:
        name = await request.app[_WORKER].report_now(batch.id)
    if not name:
        raise ApiError(404, f"No report of {batch.id} yet: its run has not started.")
    raise web.HTTPSeeOther(f"/reports/{name}")


def make_app(store: Store, worker: BatchWorker, *, api_key: str | None) -> web.Application:
    app = web.Application(middlewares=[_errors_and_auth], client_max_size=1 << 20)
    app[_STORE], app[_WORKER], app[_KEY] = store, worker, api_key or ""
    app.router.add_post("/v1/files", upload_file)
    app.router.add_get("/v1/files", list_files)
    app.router.add_get("/v1/files/{file_id}", get_file)
    app.router.add_get("/v1/files/{file_id}/content", file_content)
    app.router.add_delete("/v1/files/{file_id}", delete_file)
    app.router.add_post("/v1/batches", create_batch)
    app.router.add_get("/v1/batches", list_batches)
    app.router.add_get("/v1/batches/{batch_id}", get_batch)
    app.router.add_post("/v1/batches/{batch_id}/cancel", cancel_batch)
    app.router.add_get("/", index)
    app.router.add_get("/login", login_form)
    app.router.add_post("/login", login)
    app.router.add_post("/logout", logout)
    app.router.add_get("/reports/{name}", report)
    app.router.add_get("/batches/{batch_id}/report", report_so_far)
    return app
