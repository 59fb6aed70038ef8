"""A server reached through a Ray actor instead of HTTP: the actor runs the server on its own node (bound to that
node's loopback) and serves chat calls to the driver through Ray. Its errors come back as the kvbatch errors the
actor raised; an actor that died or is being restarted by Ray is a server gone away."""

from __future__ import annotations

import asyncio
from typing import Any

from kvbatch.errors import KvbatchError, RequestTimeoutError, ServerGoneError
from kvbatch.serve.backends.base import Backend, BackendOptions, ChatResult, ServerLimits


class ActorGoneError(ServerGoneError):
    """The actor itself died or is being restarted by Ray (not an error its server raised)."""


async def call_actor(method, *args: Any, timeout_s: float | None = None) -> Any:
    """Await one actor call; turn Ray's failures into kvbatch errors (the actor's own errors come back as raised)."""
    from ray import exceptions

    try:
        return await asyncio.wait_for(method.remote(*args), timeout_s) if timeout_s else await method.remote(*args)
    except asyncio.TimeoutError as exc:
        raise RequestTimeoutError(
            f"the Ray actor did not answer within {timeout_s:.0f} s (--request-timeout)",
            details={"timeout_s": timeout_s},
        ) from exc
    except exceptions.RayTaskError as exc:
        cause = exc.cause if isinstance(getattr(exc, "cause", None), BaseException) else None
        if isinstance(cause, KvbatchError):
            raise cause from None
        raise ActorGoneError(f"the Ray actor failed: {exc}") from exc
    except (exceptions.RayActorError, exceptions.ActorUnavailableError) as exc:
        raise ActorGoneError(f"the Ray actor is gone or restarting ({type(exc).__name__})") from exc


class RayActorBackend(Backend):
    """Chat calls to a server actor (see kvbatch.batch.run.ray_pool.ServerActor)."""

    name = "ray"

    def __init__(self, actor, label: str, options: BackendOptions | None = None) -> None:
        super().__init__(f"ray://{label}", None, options=options)
        self.actor = actor

    async def chat(
        self, body: dict[str, Any], *, slot: int | None = None, timeout_s: float | None = None
    ) -> ChatResult:
        reply = await call_actor(self.actor.chat, body, slot, timeout_s=timeout_s or self.request_timeout_s)
        return ChatResult(**reply)

    async def health(self) -> bool:
        try:
            return bool(await call_actor(self.actor.health))
        except (ServerGoneError, RequestTimeoutError):
            return False

    async def limits(self) -> ServerLimits:
        slots, context = await call_actor(self.actor.layout)
        return ServerLimits(
            slots=slots,
            slot_context_tokens=context,
            server_kind="ray actor",
            sources={"slots": "the actor's plan", "slot_context_tokens": "the actor's plan"},
        )

    async def fill(self, tokens: int, *, context_tokens: int, max_tokens: int = 4) -> int:
        raise KvbatchError("measurements run on a node's own server, not through Ray")
