"""The embedded llama-server: start, serve, cached prefix, stop without orphans, real out-of-memory under a cap."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
from batch_helpers import WAIT_CEILING_S
from kvbatch import defaults
from kvbatch.batch.inputs.sample import system_prompt
from kvbatch.errors import AuthError, ContextOverflowError, ServerGoneError, ServerStartError
from kvbatch.serve.backends import BackendOptions, get_backend
from kvbatch.serve.config import ServerConfig
from kvbatch.serve.log import parse_server_log
from kvbatch.serve.server import EmbeddedServer

SYSTEM = system_prompt(400)


def _chat(server, user: str, *, slot: int | None = None, api_key: str | None = None):
    async def go():
        backend = get_backend("openai", server.url, slot_pinning=True,
                              options=BackendOptions(api_key=api_key or server.api_key))
        try:
            return await backend.chat(
                {
                    "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}],
                    "max_tokens": 8,
                    "temperature": 0,
                },
                slot=slot,
            )
        finally:
            await backend.aclose()

    return asyncio.run(go())


def test_chat_completion_and_cached_prefix(embedded_server):
    first = _chat(embedded_server, "Candidate: Ada. Score this candidate.", slot=0)
    second = _chat(embedded_server, "Candidate: Grace. Score this candidate.", slot=0)
    assert first.completion_tokens and first.completion_tokens > 0
    assert first.finish_reason in ("length", "stop")
    assert second.prompt_tokens and second.prompt_tokens > 400
    # the shared system prompt came from the slot's prefix cache, reported through the normalized result
    assert second.cached_prompt_tokens is not None and second.cached_prompt_tokens > 400
    assert second.cached_prompt_tokens < second.prompt_tokens
    assert second.response_body["object"] == "chat.completion"


def test_server_log_reports_kv_buffers_and_slots(embedded_server):
    log = embedded_server.log()
    # Gemma 3 270M at 8192 cells: 3 global layers x 1 KiB x 8192 = 24 MiB; SWA: 15 layers x 1 KiB x 2 x 1024 = 30 MiB
    assert log.kv_buffer_bytes == {"full_CPU": 24 * 2**20, "swa_CPU": 30 * 2**20}
    assert log.slot_context_tokens == [4096, 4096]


def test_the_server_log_does_not_grow_with_the_number_of_requests(tmp_path):
    """At --log-verbosity 4 (the KV buffer lines need it) llama-server writes about 3 KB per request, 500 MB over
    170,000 requests. The file keeps the load and what went wrong; the per-request lines are dropped, and only the
    last of them are appended when the server stops."""
    server = EmbeddedServer(ServerConfig(context_tokens=2048), log_path=tmp_path / "server.log").start()
    try:
        _chat(server, "Candidate 0. Score this candidate.")
        after_one = server.log_path.stat().st_size
        for index in range(1, 25):
            _chat(server, f"Candidate {index}. Score this candidate.")
        added = server.log_path.read_text()[after_one:].splitlines()
        parsed = server.log()
    finally:
        server.stop()
    text = (tmp_path / "server.log").read_text()
    dropped = re.search(r"--- kvbatch: (\d+) per-request lines were not kept; the last (\d+) of them", text)
    assert dropped, text[-2000:]
    assert int(dropped.group(1)) >= 24 * 4  # the server did write per-request lines: several for each request
    # what reached the file while it ran: only the first few checkpoint lines (their size prices the plan)
    assert all("context checkpoint" in line for line in added), added
    assert len(added) <= defaults.KEPT_AFTER_LISTENING
    assert parsed.kv_buffer_bytes and parsed.slot_context_tokens  # the load's lines are all there


def test_too_long_prompt_is_a_context_overflow_error(embedded_server):
    with pytest.raises(ContextOverflowError, match="exceeds the available context size"):
        _chat(embedded_server, "word " * 6000)


def test_start_under_a_too_small_memory_cap_quotes_the_allocation_failure():
    config = ServerConfig(context_tokens=65536, swa_full=True, memory_cap_bytes=1200 * 2**20)
    server = EmbeddedServer(config)
    with pytest.raises(ServerStartError) as caught:
        server.start()
    assert caught.value.out_of_memory
    assert "insufficient memory" in str(caught.value) or "failed to allocate" in str(caught.value)
    assert "--ctx-size 65536" in str(caught.value)
    assert not server.is_running()


def test_stop_leaves_no_process_and_a_dead_server_is_server_gone():
    server = EmbeddedServer(ServerConfig(context_tokens=1024)).start()
    pid = server.pid
    log = server.log_path
    assert psutil.pid_exists(pid) and log.parent == Path(tempfile.gettempdir())
    server.stop()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not log.exists()  # a temporary log goes with its server: none pile up in the temp folder
    with pytest.raises(ServerGoneError, match="cannot reach"):
        _chat(server, "hello")


def test_the_embedded_server_answers_only_its_own_key_and_hides_slots(embedded_server):
    with pytest.raises(AuthError, match="HTTP 401"):
        _chat(embedded_server, "hello", api_key="not-the-key")
    for path, key, refused in (
        ("/slots", embedded_server.api_key, 501),
        ("/metrics", embedded_server.api_key, 501),
        ("/props", "not-the-key", 401),
        ("/tokenize", "not-the-key", 401),
    ):
        request = urllib.request.Request(embedded_server.url + path, headers={"Authorization": f"Bearer {key}"})
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=10)
        assert caught.value.code == refused, path
    command_line = " ".join(psutil.Process(embedded_server.pid).cmdline())
    assert embedded_server.api_key not in command_line  # other local users can read a command line
    assert "--host 127.0.0.1" in command_line


def test_server_dies_with_its_parent_even_on_kill_9(tmp_path):
    script = (
        "import time\nfrom kvbatch.serve.server import EmbeddedServer, ServerConfig\n"
        "s = EmbeddedServer(ServerConfig(context_tokens=1024)).start()\nprint(s.pid, flush=True)\ntime.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    child_pid = int(parent.stdout.readline())
    assert psutil.pid_exists(child_pid)
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + WAIT_CEILING_S  # the loop ends as soon as the child is gone
    while time.monotonic() < deadline and psutil.pid_exists(child_pid):
        try:
            if psutil.Process(child_pid).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.1)
    alive = psutil.pid_exists(child_pid) and psutil.Process(child_pid).status() != psutil.STATUS_ZOMBIE
    assert not alive, "llama-server outlived its parent"


def test_kvbatch_serve_prints_a_url_that_answers(tmp_path):
    process = subprocess.Popen(
        [sys.executable, "-m", "kvbatch.cli", "serve", "--ctx", "2048"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        first = process.stdout.readline()
        assert first.startswith("llama-server ready at http://127.0.0.1:"), first
        url = first.split()[3]
        build = process.stdout.readline()
        assert re.match(r"  build: llama\.cpp 11434\.0\.0, (CPU|CUDA): .*AVX2", build), build
        process.stdout.readline()
        key = process.stdout.readline().split()[-1]
        with urllib.request.urlopen(url + "/health", timeout=10) as reply:
            assert reply.status == 200
        body = json.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}).encode()
        request = urllib.request.Request(
            url + "/v1/chat/completions", body, {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
        )
        with urllib.request.urlopen(request, timeout=WAIT_CEILING_S) as reply:
            assert json.loads(reply.read())["choices"][0]["message"]["content"] is not None
    finally:
        process.send_signal(signal.SIGINT)
        out, _ = process.communicate(timeout=WAIT_CEILING_S)
    assert "llama-server stopped" in out
    assert process.returncode == 0


def test_parse_server_log_picks_the_allocation_failure_line():
    text = (
        "0.00.939.418 I llama_kv_cache_iswa: creating non-SWA KV cache, size = 65536 cells\n"
        "0.00.939.418 E ggml_aligned_malloc: insufficient memory (attempted to allocate 960.00 MB)\n"
        "0.00.939.500 E alloc_tensor_range: failed to allocate CPU buffer of size 1006632960\n"
        "0.01.363.720 E srv  llama_server: exiting due to model loading error\n"
    )
    log = parse_server_log(text)
    assert log.out_of_memory
    assert log.failure_line == "ggml_aligned_malloc: insufficient memory (attempted to allocate 960.00 MB)"


def test_a_server_killed_by_sigill_says_to_rebuild(tmp_path):
    fake = tmp_path / "llama-server"
    fake.write_text("#!/bin/sh\nkill -ILL $$\n")
    fake.chmod(0o755)
    with pytest.raises(ServerStartError) as caught:
        EmbeddedServer(ServerConfig(binary=fake, context_tokens=1024)).start()
    assert caught.value.exit_signal == signal.SIGILL
    assert "was killed by SIGILL (illegal instruction)" in str(caught.value)
    assert "rebuild it with `make setup`" in str(caught.value)
