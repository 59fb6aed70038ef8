"""Ray for clusters (the optional `ray` extra): one server actor per GPU (or per node on a CPU cluster), placed with a
placement group. Each actor starts the embedded server on its node, bound to that node's loopback, with a plan for
its own hardware, and serves chat calls to the driver through Ray; the driver adds the actors to the same endpoint
pool as any other server, so exactly-once output, recovery and the report hold unchanged. A dead actor is
restarted by Ray (`max_restarts`) and its requests are retried.

`--ray auto` joins a running cluster (`ray start --head`), `--ray ADDRESS` a given one, `--ray local` starts Ray on
this machine alone (`--ray-actors N` places N actors where one per node would be one).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvbatch import defaults
from kvbatch.batch.inputs.sizes import SizeProfile
from kvbatch.batch.plan.plan import least_slot_context
from kvbatch.batch.settings import BatchSettings
from kvbatch.errors import KvbatchError, OutOfMemoryError, ServerGoneError, UserInputError
from kvbatch.serve.backends import BackendOptions, get_backend
from kvbatch.serve.backends.ray_actor import ActorGoneError, RayActorBackend, call_actor
from kvbatch.serve.layout import SlotLayout
from kvbatch.serve.supervisor import EmbeddedSupervisor, ExternalSupervisor, Recovery, Supervisor, backoff_delays


def _ray():
    try:
        import ray
    except ImportError as exc:
        raise UserInputError("--ray needs the ray extra: pip install -e '.[ray]'") from exc
    return ray


def connect(address: str) -> None:
    """Join a cluster (`auto`, an address) or start Ray here alone (`local`)."""
    ray = _ray()
    if ray.is_initialized():
        return
    options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.ERROR,
                               "configure_logging": False}  # fmt: skip
    if address == "local":
        ray.init(num_cpus=len(os.sched_getaffinity(0)), **options)
    else:
        ray.init(address=address, **options)


@dataclass
class ActorSpec:
    """What one server actor needs to plan and start its server on its node."""

    settings: BatchSettings
    sizes: SizeProfile
    upstream_url: str | None = None
    """Serve through a server already on the node (benchmarks), instead of starting the embedded one."""
    upstream_slots: int = 1


class ServerActor:
    """Runs on a node: plans for the node's own memory, starts the server, and serves chat calls."""

    def __init__(self, spec: ActorSpec) -> None:
        self.spec = spec
        self.supervisor: Supervisor | None = None
        self._started: asyncio.Task | None = None
        self._logs: Path | None = None
        """Its server's logs, on its node: removed when the run ends with it (`shutdown`)."""

    async def _start(self) -> None:
        if self.supervisor is not None:
            return
        if self._started is None:
            self._started = asyncio.ensure_future(self._build())
        await asyncio.shield(self._started)

    async def _build(self) -> None:
        spec = self.spec
        if spec.upstream_url:
            backend = get_backend("openai", spec.upstream_url, options=spec.settings.backend_options())
            supervisor: Supervisor = ExternalSupervisor(backend, SlotLayout(spec.upstream_slots, 8192))
        else:
            from kvbatch.batch.inputs.endpoints import EndpointSpec
            from kvbatch.batch.plan.probe import probe_base
            from kvbatch.batch.plan.server_plans import embedded_plan

            logs = self._logs = Path(tempfile.mkdtemp(prefix="kvbatch-ray-"))
            gpus = _ray().get_gpu_ids()  # the card Ray gave this actor: its plan is for that card
            node = EndpointSpec("embedded", gpu=int(gpus[0]) if gpus else None)
            base = await asyncio.to_thread(probe_base, spec.settings, logs)
            planned = await embedded_plan(spec.settings, spec.sizes, node, base, 1)
            need = least_slot_context(spec.sizes, planned.plan.layout.slot_context_tokens)
            assert planned.config is not None
            supervisor = EmbeddedSupervisor(planned.config, planned.plan.layout, min_slot_context=need,
                                            log_path=logs / "server.log",
                                            request_timeout_s=spec.settings.request_timeout_s)  # fmt: skip
        await supervisor.start()
        self.supervisor = supervisor

    async def ready(self) -> tuple[int, int]:
        await self._start()
        return await self.layout()

    async def layout(self) -> tuple[int, int]:
        await self._start()
        layout = self.supervisor.layout
        return layout.slots, layout.slot_context_tokens

    async def chat(self, body: dict[str, Any], slot: int | None) -> dict[str, Any]:
        await self._start()
        result = await self.supervisor.backend.chat(body, slot=slot)
        return dataclasses.asdict(result)

    async def health(self) -> bool:
        await self._start()
        return await self.supervisor.backend.health()

    async def recover(self, cause: str, out_of_memory: bool) -> tuple[str, bool, int, int, bool]:
        await self._start()
        error = OutOfMemoryError(cause) if out_of_memory else ServerGoneError(cause)
        recovery = await self.supervisor.recover(error)
        layout = self.supervisor.layout
        return recovery.action, recovery.out_of_memory, layout.slots, layout.slot_context_tokens, recovery.found_down

    async def restart(self, cause: str) -> tuple[str, int, int]:
        await self._start()
        recovery = await self.supervisor.restart(ServerGoneError(cause))
        layout = self.supervisor.layout
        action = recovery.action if recovery is not None else "not ours to restart"
        return action, layout.slots, layout.slot_context_tokens

    async def shutdown(self) -> None:
        """The run is over: stop the server and remove its logs (a killed actor cannot; its node's temp folder
        would keep a folder per actor per run)."""
        if self.supervisor is not None:
            await self.supervisor.close()
        if self._logs is not None:
            shutil.rmtree(self._logs, ignore_errors=True)

    def server_pid(self) -> int | None:
        return self.supervisor.pid if self.supervisor else None

    def node(self) -> str:
        return _ray().get_runtime_context().get_node_id()


class RaySupervisor(Supervisor):
    """The driver's side of one server actor: starts it, and brings it back (Ray restarts a dead actor)."""

    restarts_itself = True

    def __init__(self, actor, label: str, *, max_wait_s: float = defaults.MAX_WAIT_S,
                 options: BackendOptions | None = None) -> None:  # fmt: skip
        self.actor = actor
        self.label = label
        self.layout = SlotLayout(1, 0)
        self.max_wait_s = max_wait_s
        self.backend = RayActorBackend(actor, label, options)
        self._node: str | None = None

    def flags(self) -> dict[str, object]:
        return {"ray_actor": self.label, "node": self._node, "slots": self.layout.slots,
                "slot_context_tokens": self.layout.slot_context_tokens}  # fmt: skip

    async def _refresh(self) -> None:
        self._run_with(SlotLayout(*await call_actor(self.actor.ready)))

    async def start(self) -> list[Recovery]:
        await self._refresh()
        self._node = await call_actor(self.actor.node)
        return []

    async def recover(self, cause: KvbatchError) -> Recovery:
        started = time.perf_counter()
        before = self.layout
        try:
            action, oom, slots, context, found_down = await call_actor(self.actor.recover, str(cause)[:300],
                                                                       isinstance(cause, OutOfMemoryError))  # fmt: skip
            self._run_with(SlotLayout(slots, context))
            return Recovery(str(cause)[:300], f"actor: {action}", time.perf_counter() - started, oom, found_down,
                            layout=self._changed_since(before))  # fmt: skip
        except ActorGoneError:
            pass  # the actor itself died: Ray restarts it, and its __init__ starts a new server
        for delay in backoff_delays(1.0):
            if time.perf_counter() - started > self.max_wait_s:
                raise ServerGoneError(f"the Ray actor {self.label} did not come back within {self.max_wait_s:.0f} s")
            try:
                await self._refresh()
                break
            except ActorGoneError:
                await asyncio.sleep(delay)
        return Recovery(str(cause)[:300], "Ray restarted the actor", time.perf_counter() - started, False,
                        layout=self._changed_since(before))  # fmt: skip

    async def restart(self, cause: KvbatchError) -> Recovery:
        started = time.perf_counter()
        action, slots, context = await call_actor(self.actor.restart, str(cause)[:300])
        before = self.layout
        self._run_with(SlotLayout(slots, context))
        return Recovery(str(cause)[:300], f"actor: {action}", time.perf_counter() - started, False, False,
                        layout=self._changed_since(before))  # fmt: skip

    async def close(self) -> None:
        with contextlib.suppress(Exception):  # an actor already gone has nothing to clean: Ray's kill ends it
            await call_actor(self.actor.shutdown, timeout_s=defaults.RAY_SHUTDOWN_S)
        with_ray = _ray()
        with_ray.kill(self.actor, no_restart=True)


def actor_count(requested: int | None) -> tuple[int, bool]:
    """One actor per GPU in the cluster, else one per alive node (unless a count is given)."""
    ray = _ray()
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if requested:
        return requested, gpus >= requested
    if gpus:
        return gpus, True
    return max(1, sum(1 for node in ray.nodes() if node.get("Alive"))), False


def start_actors(specs: list[ActorSpec], *, on_gpu: bool, label: str = "ray", cpus: float = 1.0) -> list[RaySupervisor]:
    """Place one actor per spec with a placement group (spread over nodes), and their supervisors. `cpus` is what
    each actor reserves (an actor that only relays to a server on its node needs little)."""
    ray = _ray()
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    bundle = {"CPU": cpus, "GPU": 1} if on_gpu else {"CPU": cpus}
    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    # one per node where there are enough nodes (a CPU cluster); else as evenly as Ray can (GPUs, or more actors)
    strategy = "STRICT_SPREAD" if not on_gpu and len(specs) <= nodes and nodes > 1 else "SPREAD"
    group = placement_group([bundle] * len(specs), strategy=strategy)
    ray.get(group.ready(), timeout=120)
    remote = ray.remote(max_restarts=defaults.ACTOR_RESTARTS, max_task_retries=0, max_concurrency=64)(ServerActor)
    supervisors = []
    for index, spec in enumerate(specs):
        strategy = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=index)
        actor = remote.options(num_cpus=cpus, num_gpus=1 if on_gpu else 0, scheduling_strategy=strategy).remote(spec)
        supervisors.append(RaySupervisor(actor, f"{label}-{index}", max_wait_s=spec.settings.max_wait_s,
                                         options=spec.settings.backend_options()))  # fmt: skip
    return supervisors


def ray_supervisors(endpoint, settings: BatchSettings, sizes: SizeProfile) -> list[RaySupervisor]:
    """The run's Ray endpoints: connect, count, place, start."""
    connect(settings.ray or "auto")
    count, on_gpu = actor_count(settings.ray_actors)
    return start_actors([ActorSpec(settings, sizes) for _ in range(count)], on_gpu=on_gpu)
