"""`kvbatch api` through the official `openai` SDK: submit, poll, download; `kill -9` mid-batch and a restart on the
same store; two batches queued in order; cancel; a bad line; a wrong key; list pagination; the status page in
headless Chromium; webhooks signed the Standard Webhooks way; one end-to-end case on the real embedded server."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import openai
import pytest
from aiohttp import web
from background import OpenAIDouble
from batch_helpers import WAIT_CEILING_S, kvbatch, small_batch, start_kvbatch, stop_started, wait_until
from chromium import Browser, chromium_binary

KEY = "sk-local-test"


class QuickServer(OpenAIDouble):
    """An OpenAI-compatible server that answers every chat request after `delay_s` (the user message echoed), and
    counts what it was asked; a webhook receiver on the same app keeps what it is sent."""

    def __init__(self, delay_s: float = 0.0) -> None:
        super().__init__()
        self.delay_s = delay_s
        self.asked = 0
        self.hooks: list[tuple[dict, bytes]] = []
        self.team_hooks: list[dict] = []
        self.hooks_down = False
        """While true, /hook answers 503 (a receiver down) and counts the attempt in `hooks_refused`."""
        self.hooks_refused = 0

    model = "quick"

    def make_app(self) -> web.Application:
        app = super().make_app()
        app.router.add_post("/hook", self.hook)
        app.router.add_post("/team/hook", self.team_hook)
        return app

    async def hook(self, request: web.Request) -> web.Response:
        if self.hooks_down:
            self.hooks_refused += 1
            return web.json_response({"error": "receiver down"}, status=503)
        self.hooks.append((dict(request.headers), await request.read()))
        return web.json_response({})

    async def team_hook(self, request: web.Request) -> web.Response:
        self.team_hooks.append(json.loads(await request.read()))
        return web.json_response({})

    async def chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.asked += 1
        if "DENY" in body["messages"][-1]["content"]:  # a key this server refuses, for this request alone
            return web.json_response({"error": {"message": "invalid api key", "type": "auth"}}, status=401)
        if "REJECT" in body["messages"][-1]["content"]:  # refused for itself, in llama-server's error shape
            return web.json_response({"error": {"code": 400, "message": "REJECTED: this request names no candidate",
                                                "type": "invalid_request_error"}}, status=400)  # fmt: skip
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        text = f"echo: {body['messages'][-1]['content'][:40]}"
        prompt = sum(len(m["content"]) for m in body["messages"]) // 3  # a count the truncation guard believes
        return web.json_response({
            "id": "chatcmpl-q", "object": "chat.completion", "created": int(time.time()), "model": "quick",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": 4, "total_tokens": prompt + 4},
        })  # fmt: skip


def _api(tmp_path: Path, *extra: str, env: dict[str, str] | None = None, report: bool = False):
    process = start_kvbatch("api", "--port", "0", "--data", str(tmp_path / "api"), "--no-progress",
                            *([] if report else ["--no-report"]), *extra, cwd=tmp_path, env=env)  # fmt: skip
    assert process.stdout is not None
    deadline = time.monotonic() + WAIT_CEILING_S
    lines = []
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            raise AssertionError("kvbatch api ended before it listened:\n" + "".join(lines))
        lines.append(line)
        found = re.search(r"OpenAI Batch API at (http://\S+/v1)", line)
        if found:
            return process, found.group(1)
    raise AssertionError("kvbatch api did not listen")


def _client(url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0)


def _wait(client: openai.OpenAI, batch_id: str, until, ceiling_s: float = WAIT_CEILING_S):
    deadline = time.monotonic() + ceiling_s
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if until(batch):
            return batch
        time.sleep(0.2)
    raise AssertionError(f"batch {batch_id} never got there: {batch}")


def _output_ids(client: openai.OpenAI, file_id: str) -> list[str]:
    return [json.loads(line)["custom_id"] for line in client.files.content(file_id).text.splitlines() if line]


@pytest.fixture(autouse=True)
def _stop_apis():
    yield
    stop_started()


def test_submit_poll_download_with_a_key_and_a_wrong_key_gets_401(tmp_path):
    batch_file = small_batch(tmp_path / "in.jsonl", 30)
    with QuickServer() as server:
        _, url = _api(tmp_path, "--url", server.url, "--api-key-env", "KVBATCH_TEST_KEY",
                      env={"KVBATCH_TEST_KEY": KEY})  # fmt: skip
        with pytest.raises(openai.AuthenticationError) as refused:
            _client(url, "sk-wrong").batches.list()
        assert refused.value.status_code == 401 and refused.value.body["code"] == "invalid_api_key"
        client = _client(url)
        uploaded = client.files.create(file=batch_file.open("rb"), purpose="batch")
        assert uploaded.bytes == batch_file.stat().st_size and uploaded.purpose == "batch"
        created = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                        completion_window="24h", metadata={"project": "screening"})  # fmt: skip
        assert created.status == "validating" and created.metadata == {"project": "screening"}
        done = _wait(client, created.id, lambda b: b.status == "completed")
    assert done.request_counts.total == done.request_counts.completed == 30 and done.request_counts.failed == 0
    assert done.in_progress_at and done.finalizing_at and done.completed_at and done.error_file_id is None
    ids = _output_ids(client, done.output_file_id)
    assert sorted(ids) == sorted(f"candidate-{i:06d}" for i in range(30))
    line = json.loads(client.files.content(done.output_file_id).text.splitlines()[0])
    assert line["response"]["status_code"] == 200 and line["response"]["body"]["object"] == "chat.completion"
    assert [f.id for f in client.files.list()][:2] == [done.output_file_id, uploaded.id]
    assert client.files.delete(uploaded.id).deleted and uploaded.id not in [f.id for f in client.files.list()]
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nothere")


def test_kill_9_mid_batch_and_a_restart_finish_it_with_each_custom_id_once(tmp_path):
    batch_file = small_batch(tmp_path / "in.jsonl", 300)
    with QuickServer(delay_s=0.02) as server:
        process, url = _api(tmp_path, "--url", server.url, "--concurrency", "2")
        client = _client(url)
        uploaded = client.files.create(file=batch_file.open("rb"), purpose="batch")
        batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                      completion_window="24h")  # fmt: skip
        _wait(client, batch.id, lambda b: b.request_counts.completed >= 40)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        asked_before = server.asked
        _, url = _api(tmp_path, "--url", server.url, "--concurrency", "2")
        client = _client(url)
        done = _wait(client, batch.id, lambda b: b.status == "completed")
        asked = server.asked
    ids = _output_ids(client, done.output_file_id)
    assert len(ids) == len(set(ids)) == 300  # each once, whatever the kill cut
    assert asked - asked_before <= 300 - 40 + 4  # the restart sent only what was not done (and what was in flight)


def test_two_batches_run_in_order_and_a_cancelled_one_keeps_what_it_did(tmp_path):
    first, second = small_batch(tmp_path / "a.jsonl", 400), small_batch(tmp_path / "b.jsonl", 5)
    with QuickServer(delay_s=0.02) as server:
        _, url = _api(tmp_path, "--url", server.url, "--concurrency", "1")
        client = _client(url)
        ids = [client.files.create(file=path.open("rb"), purpose="batch").id for path in (first, second)]
        a, b = (client.batches.create(input_file_id=i, endpoint="/v1/chat/completions", completion_window="24h")
                for i in ids)  # fmt: skip
        running = _wait(client, a.id, lambda x: x.request_counts.completed >= 10)
        assert running.status == "in_progress" and client.batches.retrieve(b.id).status == "validating"
        cancelling = client.batches.cancel(a.id)
        assert cancelling.status == "cancelling"
        cancelled = _wait(client, a.id, lambda x: x.status == "cancelled")
        done = _wait(client, b.id, lambda x: x.status == "completed")
    assert 10 <= cancelled.request_counts.completed < 400 and cancelled.cancelled_at
    assert len(_output_ids(client, cancelled.output_file_id)) == cancelled.request_counts.completed
    assert done.in_progress_at >= cancelled.cancelling_at  # the second waited for the first
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(done.id)


def test_a_bad_line_fails_the_batch_with_every_bad_line_listed_and_pages_list_in_order(tmp_path):
    good = small_batch(tmp_path / "good.jsonl", 2).read_text().splitlines()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([good[0], "{not json", json.dumps({"custom_id": "x", "body": {"messages": []}})]) + "\n")
    with QuickServer() as server:
        _, url = _api(tmp_path, "--url", server.url)
        client = _client(url)
        file_id = client.files.create(file=bad.open("rb"), purpose="batch").id
        failed = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
        failed = _wait(client, failed.id, lambda b: b.status == "failed")
        assert [(e.line, e.code) for e in failed.errors.data] == [(2, "invalid_request"), (3, "invalid_request")]
        assert "invalid JSON" in failed.errors.data[0].message and failed.failed_at
        assert "body.messages" in failed.errors.data[1].message
        made = [client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                      completion_window="24h").id for _ in range(4)]  # fmt: skip
        newest_first = [failed.id, *made][::-1]
        first = client.batches.list(limit=2)
        assert [b.id for b in first.data] == newest_first[:2] and first.has_more
        seen = [b.id for b in client.batches.list(limit=2)]  # the SDK follows `after` page by page
        assert seen == newest_first
        uploads = [file_id, *(client.files.create(file=bad.open("rb"), purpose="batch").id for _ in range(3))]
        files = client.files.list(limit=3)  # the Files API pages the same way, newest first or in `order`
        assert [f.id for f in files.data] == uploads[::-1][:3] and files.has_more
        assert [f.id for f in client.files.list(limit=3)] == uploads[::-1]
        assert [f.id for f in client.files.list(limit=1, order="asc")] == uploads
        with pytest.raises(openai.BadRequestError) as refused:
            client.batches.create(input_file_id=file_id, endpoint="/v1/embeddings", completion_window="24h")
        assert refused.value.body["param"] == "endpoint"


def test_the_status_page_shows_every_batch_in_chromium_and_webhooks_are_signed(tmp_path):
    secret = "whsec_" + base64.b64encode(b"kvbatch-test-secret").decode()
    batch_file = small_batch(tmp_path / "in.jsonl", 6)
    with QuickServer() as server:
        _, url = _api(tmp_path, "--url", server.url, "--webhook-url", f"{server.url}/hook",
                      "--webhook-secret-env", "KVBATCH_HOOK_SECRET", env={"KVBATCH_HOOK_SECRET": secret})  # fmt: skip
        client = _client(url)
        file_id = client.files.create(file=batch_file.open("rb"), purpose="batch").id
        done = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
        done = _wait(client, done.id, lambda b: b.status == "completed")
        deadline = time.monotonic() + WAIT_CEILING_S
        while not server.hooks and time.monotonic() < deadline:
            time.sleep(0.1)
        headers, body = server.hooks[0]
        browser = chromium_binary()
        assert browser, "make test installs Debian's chromium"
        page = url.removesuffix("/v1") + "/"
        shot = tmp_path / "status.png"
        dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", page],
                             capture_output=True, text=True, timeout=WAIT_CEILING_S).stdout  # fmt: skip
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                        "--window-size=1400,600", page], capture_output=True, timeout=WAIT_CEILING_S)  # fmt: skip
    event = json.loads(body)
    assert event["type"] == "batch.completed" and event["data"]["id"] == done.id and event["object"] == "event"
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(b"kvbatch-test-secret", signed, hashlib.sha256).digest()).decode()
    assert headers["webhook-signature"] == f"v1,{expected}"
    assert f'data-batch="{done.id}"' in dom and "completed" in dom and "6 of 6 (100%)" in dom
    assert f"/v1/files/{done.output_file_id}/content" in dom
    assert shot.stat().st_size > 5000  # the screenshot is kept with the test's files
    kept = Path(os.environ.get("KVBATCH_SCREENSHOTS", tmp_path))
    kept.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, kept / "api-status-page.png")


def test_a_batch_on_the_real_embedded_server_with_its_plan_and_report(tmp_path):
    batch_file = small_batch(tmp_path / "in.jsonl", 3)
    process = start_kvbatch("api", "--port", "0", "--data", str(tmp_path / "api"), "--no-progress",
                            "--concurrency", "1", cwd=tmp_path)  # fmt: skip
    assert process.stdout is not None
    url = None
    while url is None:
        line = process.stdout.readline()
        assert line, "kvbatch api ended before it listened"
        found = re.search(r"OpenAI Batch API at (http://\S+/v1)", line)
        url = found.group(1) if found else None
    client = _client(url, "unused-on-loopback")
    file_id = client.files.create(file=batch_file.open("rb"), purpose="batch").id
    batch = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
    done = _wait(client, batch.id, lambda b: b.status in ("completed", "failed"))
    assert done.status == "completed" and done.request_counts.completed == 3, done
    extra = done.model_extra["x_kvbatch"]
    assert extra["plan"].startswith("plan (independent mode) for 3 requests") and "memory: base" in extra["plan"]
    assert extra["report"].endswith(".html")
    answers = [json.loads(line)["response"]["body"]["choices"][0]["message"]["content"]
               for line in client.files.content(done.output_file_id).text.splitlines()]  # fmt: skip
    assert len(answers) == 3 and all(answers)
    page = url.removesuffix("/v1")
    import urllib.request

    with urllib.request.urlopen(f"{page}/reports/{extra['report']}") as reply:  # noqa: S310 (loopback)
        assert b"kvbatch run report" in reply.read()


def test_a_batch_that_can_never_run_fails_and_the_queue_goes_on_and_its_input_cannot_be_deleted(tmp_path):
    denied = tmp_path / "denied.jsonl"
    lines = small_batch(tmp_path / "a.jsonl", 3).read_text().splitlines()
    denied.write_text("\n".join(line.replace("Score this candidate.", "DENY") for line in lines) + "\n")
    good = small_batch(tmp_path / "b.jsonl", 4)
    with QuickServer() as server:
        _, url = _api(tmp_path, "--url", server.url)
        client = _client(url)
        denied_id, good_id = (client.files.create(file=p.open("rb"), purpose="batch").id for p in (denied, good))
        first = client.batches.create(input_file_id=denied_id, endpoint="/v1/chat/completions", completion_window="24h")
        second = client.batches.create(input_file_id=good_id, endpoint="/v1/chat/completions", completion_window="24h")
        with pytest.raises(openai.ConflictError):
            client.files.delete(good_id)  # the input of a batch that has not ended
        done = _wait(client, second.id, lambda b: b.status == "completed")
        failed = client.batches.retrieve(first.id)
    assert failed.status == "failed" and failed.errors.data[0].code == "AuthError", failed
    assert done.request_counts.completed == 4


def test_a_batchs_own_receiver_is_called_only_where_the_operator_allows_it(tmp_path):
    """`metadata.webhook_url` is not OpenAI's: a service several clients reach calls only receivers its operator
    configured. One batch names a receiver under the allowed prefix (called), one names another (never called)."""
    batch_file = small_batch(tmp_path / "in.jsonl", 2)
    with QuickServer() as server:
        _, url = _api(tmp_path, "--url", server.url, "--batch-webhook-prefix", f"{server.url}/team/")
        client = _client(url)
        file_id = client.files.create(file=batch_file.open("rb"), purpose="batch").id
        refused = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                        completion_window="24h", metadata={"webhook_url": f"{server.url}/hook"})
        allowed = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                        completion_window="24h", metadata={"webhook_url": f"{server.url}/team/hook"})
        _wait(client, refused.id, lambda b: b.status == "completed")
        _wait(client, allowed.id, lambda b: b.status == "completed")
        deadline = time.monotonic() + WAIT_CEILING_S
        while not server.team_hooks and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [e["data"]["id"] for e in server.team_hooks] == [allowed.id]
        assert not server.hooks  # the batch that finished first named a receiver the operator did not allow


def test_a_webhook_pending_when_the_api_is_killed_is_sent_after_the_restart_under_one_event_id(tmp_path):
    """The receiver is down when the batch completes: the event waits in the store's outbox (`kvbatch webhooks`
    lists it pending, its attempts refused); `kill -9` of the API, the receiver back, a restart: the event arrives,
    every copy under the one `webhook-id` it was given when the batch completed, and the outbox says delivered."""
    batch_file = small_batch(tmp_path / "in.jsonl", 3)
    data = str(tmp_path / "api")

    def outbox() -> str:
        listed = kvbatch("webhooks", "--data", data, cwd=tmp_path)
        assert listed.returncode == 0, listed.stdout + listed.stderr
        return listed.stdout

    with QuickServer() as server:
        server.hooks_down = True
        process, url = _api(tmp_path, "--url", server.url, "--webhook-url", f"{server.url}/hook")
        client = _client(url)
        file_id = client.files.create(file=batch_file.open("rb"), purpose="batch").id
        batch = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
        _wait(client, batch.id, lambda b: b.status == "completed")
        pending = wait_until(lambda: "HTTP 503" in (text := outbox()) and text, "the outbox recorded a refusal",
                             process)  # fmt: skip
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        server.hooks_down = False
        _api(tmp_path, "--url", server.url, "--webhook-url", f"{server.url}/hook")
        wait_until(lambda: server.hooks, "the event arrived after the restart")
        delivered = wait_until(lambda: "1 delivered" in (text := outbox()) and text, "the outbox said delivered")
    assert "1 pending, 0 delivered, 0 given_up" in pending and f"batch.completed  {batch.id}" in pending, pending
    assert server.hooks_refused >= 1
    ids = {headers["webhook-id"] for headers, _ in server.hooks}
    events = [json.loads(body) for _, body in server.hooks]
    assert len(ids) == 1 and ids == {events[0]["id"]}, ids
    assert all(e["type"] == "batch.completed" and e["data"]["id"] == batch.id for e in events), events
    assert ids.pop() in pending and "0 pending, 1 delivered, 0 given_up" in delivered, delivered


def test_an_event_no_receiver_takes_is_given_up_at_the_configured_age_and_others_are_still_sent(tmp_path):
    """The courier in-process, on a real store: a receiver that never answers (a closed port) is tried with
    back-off until the event is older than the give-up age, then given up; a receiver that answers gets its copy."""
    from kvbatch.api.models import BatchObject
    from kvbatch.api.store import Store
    from kvbatch.api.webhooks import Webhooks

    async def go(server: QuickServer) -> list:
        store = Store(tmp_path / "api")
        webhooks = Webhooks(store, f"{server.url}/hook", None, give_up_after_s=1.0, first_delay_s=0.1,
                            allowed_prefixes=("http://127.0.0.1:9/",))  # fmt: skip
        batch = BatchObject(id="batch_x", endpoint="/v1/chat/completions", input_file_id="file_x",
                            completion_window="24h", created_at=int(time.time()), status="finalizing",
                            metadata={"webhook_url": "http://127.0.0.1:9/closed"})  # fmt: skip
        store.add_batch(batch)
        batch.status = "completed"
        assert store.save_batch(batch, deliveries=webhooks.deliveries_for(batch))
        assert not store.save_batch(batch, deliveries=webhooks.deliveries_for(batch))  # an end is not written twice
        courier = asyncio.create_task(webhooks.forever())
        deadline = time.monotonic() + WAIT_CEILING_S
        while any(d.state == "pending" for d in store.deliveries()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        courier.cancel()
        deliveries = store.deliveries()
        store.close()
        return deliveries

    with QuickServer() as server:
        deliveries = asyncio.run(go(server))
    by_url = {d.url: d for d in deliveries}
    closed, hook = by_url["http://127.0.0.1:9/closed"], by_url[f"{server.url}/hook"]
    assert closed.state == "given_up" and closed.attempts >= 2 and closed.last_error, closed
    assert closed.ended_at - closed.created_at >= 1.0
    assert hook.state == "delivered" and hook.attempts == 1 and closed.event_id == hook.event_id
    assert [json.loads(body)["data"]["id"] for _, body in server.hooks] == ["batch_x"]


def test_behind_a_key_a_person_logs_in_once_in_chromium_and_opens_the_page_and_a_report_but_changes_nothing(tmp_path):
    """A keyed API (as beyond loopback): a browser without the key is sent to a login form, for the page and for a
    report, and a key in the URL opens nothing; a wrong key is refused; the right one, typed once, opens the page
    and, by its link, the batch's report. The cookie is HttpOnly and good for reading only: a script on the page
    cannot cancel a batch with it. The SDK keeps its Bearer key; logging out closes the page again."""
    batch_file = small_batch(tmp_path / "in.jsonl", 4)
    with QuickServer() as server:
        _, url = _api(tmp_path, "--url", server.url, "--api-key-env", "KVBATCH_TEST_KEY", env={"KVBATCH_TEST_KEY": KEY},
                      report=True)  # fmt: skip
        client = _client(url)
        file_id = client.files.create(file=batch_file.open("rb"), purpose="batch").id
        batch = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
        done = _wait(client, batch.id, lambda b: b.status == "completed")
        report = done.model_extra["x_kvbatch"]["report"]
        root = url.removesuffix("/v1")
        fill = "document.querySelector('input[name=key]').value = {!r}; document.forms[0].submit()"

        async def a_person() -> dict:
            async with Browser(tmp_path) as browser:
                seen = {"page": (await browser.open(f"{root}/"), await browser.text())}
                seen["report"] = (await browser.open(f"{root}/reports/{report}"), await browser.text())
                seen["key in the url"] = (await browser.open(f"{root}/?key={KEY}"), await browser.text())
                seen["wrong key"] = (await browser.act(fill.format("sk-wrong")), await browser.text())
                seen["right key"] = (await browser.act(fill.format(KEY)), await browser.html())
                seen["script sees"] = await browser.evaluate("document.cookie")
                seen["cancel"] = await browser.evaluate(f"fetch('/v1/batches/{batch.id}/cancel', {{method: 'POST'}})"
                                                        ".then(r => r.status)")  # fmt: skip
                seen["report link"] = (await browser.act("document.querySelector('a[href^=\"/reports/\"]').click()"),
                                       await browser.text())  # fmt: skip
                await browser.open(f"{root}/")
                await browser.act("document.querySelector('form[action=\"/logout\"]').submit()")
                seen["after logout"] = await browser.open(f"{root}/")
            return seen

        seen = asyncio.run(a_person())
        still = client.batches.retrieve(batch.id)
    for what in ("page", "report", "key in the url", "wrong key"):
        path, text = seen[what]
        assert path == "/login" and "API key" in text and batch.id not in text, (what, path, text)
    assert "not the key this service was started with" in seen["wrong key"][1]
    path, page = seen["right key"]
    assert path == "/" and f'data-batch="{batch.id}"' in page and "4 of 4 (100%)" in page, page
    assert seen["script sees"] == "" and seen["cancel"] == 401 and still.status == "completed"
    assert seen["report link"][0] == f"/reports/{report}" and "kvbatch run report" in seen["report link"][1]
    assert seen["after logout"] == "/login"


def test_while_a_batch_runs_its_page_lists_its_failed_requests_draws_its_throughput_and_opens_its_report(tmp_path):
    """A long batch (each answer takes at least 0.1 s: 400 s at the least, whatever the machine) in which the server
    refuses two requests for themselves: the page, in Chromium, lists those two with the server's reason, draws
    requests/s over the run, and its "report so far" link renders the run report while the batch still runs."""
    path = small_batch(tmp_path / "in.jsonl", 4000)
    lines = path.read_text().splitlines()
    for index in (1, 3):
        lines[index] = lines[index].replace("Score this candidate.", "REJECT")
    path.write_text("\n".join(lines) + "\n")
    with QuickServer(delay_s=0.1) as server:
        _, url = _api(tmp_path, "--url", server.url, "--concurrency", "1")
        client = _client(url)
        file_id = client.files.create(file=path.open("rb"), purpose="batch").id
        batch = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
        _wait(client, batch.id, lambda b: b.request_counts.failed == 2 and len(b.model_extra["x_kvbatch"].get(
            "throughput", [])) >= 3)  # fmt: skip
        root = url.removesuffix("/v1")

        async def look() -> tuple:
            async with Browser(tmp_path) as browser:
                await browser.open(f"{root}/")
                page = await browser.html()
                report = await browser.act("document.querySelector('a[href$=\"/report\"]').click()")
                return page, report, await browser.text()

        page, report_path, report_text = asyncio.run(look())
        running = client.batches.retrieve(batch.id)
        client.batches.cancel(batch.id)
    assert running.status == "in_progress", running  # the report was rendered while the batch ran
    assert 'data-failed="candidate-000001"' in page and 'data-failed="candidate-000003"' in page, page
    assert "REJECTED: this request names no candidate" in page
    points = re.search(r'<svg class="throughput" data-points="(\d+)"', page)
    assert points and int(points.group(1)) >= 2, page
    assert report_path.startswith("/reports/") and "kvbatch run report" in report_text, (report_path, report_text)
