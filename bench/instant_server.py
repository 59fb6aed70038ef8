"""An OpenAI-compatible server that answers every chat completion at once with a fixed reply: it measures what
the client side costs (kvbatch's executor, or a bare loop) when the server costs nothing.

Run: python bench/instant_server.py PORT   (binds 127.0.0.1 only)
"""

from __future__ import annotations

import sys

from aiohttp import web

REPLY = (
    b'{"id":"chatcmpl-1","object":"chat.completion","created":0,"model":"instant","choices":[{"index":0,'
    b'"message":{"role":"assistant","content":"DECISION: hold"},"finish_reason":"stop"}],"usage":{"prompt_tokens":'
    b'2800,"completion_tokens":4,"total_tokens":2804,"prompt_tokens_details":{"cached_tokens":2400}}}'
)


async def chat(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=REPLY, content_type="application/json")


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def main() -> None:
    app = web.Application(client_max_size=64 * 2**20)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/health", health)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)


if __name__ == "__main__":
    main()
