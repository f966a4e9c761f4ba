"""The Ray Serve application: an HTTP ingress deployment in front of the engine deployments.

    HTTP -> Ingress (FastAPI: auth, limits, validation, tokenization, SSE)
         -> Engine (scheduler: continuous batching over the KV cache; the model, whose experts
            live in-process or on ExpertShard actors), `engine_replicas` of them at first
            (up to `max_engine_replicas`: serving/control/engine_scaler.py)
            (-> ExpertShards, serving/api/shared_shards.py, when several engines share shards)
Each request is one `Engine.submit` call to the engine with fewest of the ingress's requests in
flight; its events come back on the one stream each ingress replica keeps open to each engine
(serving/api/streams.py), one message per step for all of them.

`build_app` is the builder Ray Serve's own tools call (`serve run configs/serve.yaml`, or
`serve run serving.api.app:build_app model=DIR`); `moe-serve up` calls `application`.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import ray
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from experts.pool import ElasticPool
from serving.api.engines import (
    engine_ask,
    engine_names,
    engine_threads,
    ingress_streams,
    merged_status,
    total_stats,
    within,
)
from serving.api.serving_model import load_serving_model, model_dir, served_name
from serving.api.streams import Batch, EngineChoice, EngineStreams
from serving.config import ServeConfig, config_from_args
from serving.engine import cpu_bind
from serving.engine.requests import Admission, Job

APP_NAME = "moe-serve"
# How often Serve checks, while deleting the app, whether a replica's requests are done. Serve's
# default (2 s) made a drained shutdown take seconds longer than its requests did.
GRACEFUL_POLL_S = 0.2


@serve.deployment(name="Engine")
class Engine:
    """Holds the model and the scheduler; every running request shares its decode steps.

    It also records the engine's metrics, answers the controller (`counters`, `apply`) and starts
    it (serving/control/controller_app.py), as configured by `config.monitoring`.
    """

    def __init__(
        self, config: ServeConfig, first: bool = True, owner: DeploymentHandle | None = None
    ) -> None:
        import torch

        from serving.control.controller_app import deployment_plan
        from serving.control.monitor import EngineMonitor
        from serving.engine.scheduler import Scheduler
        from serving.engine.tokenizer import TextTokenizer

        torch.set_num_threads(engine_threads(config))
        model = load_serving_model(config, owner)
        model.split_min_tokens = config.micro_batch_min_tokens
        # With shards the model's pool is the Ray pool: handed to whoever operates it.
        self.pool: ElasticPool | None = model.pool if config.expert_shards else None
        tokenizer = TextTokenizer(model_dir(config))
        plan = deployment_plan(config, model_dir(config))  # targets and the efficiency basis
        scheduler_config = config.scheduler.model_copy(
            update={"cache_slots": fallback_slots(config, plan)}
        )
        self.scheduler = Scheduler(model, scheduler_config, decode=tokenizer.decode)
        if config.engine_cpus:  # the forward pass on cores of its own (serving/engine/cpu_bind.py)
            self.scheduler.forward_thread = cpu_bind.bound_thread(config.engine_cpus)
        # On one core, the event loop (the scheduler's work between forward passes) joins it.
        self._loop_cpus = cpu_bind.loop_cores(config.engine_cpus)
        self._loop_bound = False
        self.monitor = EngineMonitor(
            self.scheduler,
            self.pool,
            _metrics() if config.monitoring.metrics else None,
            on_gpu=config.device.startswith("cuda"),
            period_s=config.monitoring.period_s,
            plan=plan,
            accounting_window_s=config.monitoring.accounting_window_s,
            cluster_autoscaling=config.cluster_autoscaling,
        )
        self.scheduler.observer = self.monitor.on_step
        self.streams = EngineStreams(self.scheduler)
        self._closing: asyncio.Task | None = None  # closes the streams once drained
        self._retiring: asyncio.Task | None = None  # stops this replica once drained
        self.drain_timeout_s = config.drain_timeout_s
        self._monitor_task: asyncio.Task | None = None
        # The first engine starts the controller; it reads and acts on every engine.
        controller = config.monitoring.controller and first
        self.controller = _start_controller(config, plan) if controller else None

    def _ensure_monitor(self) -> None:
        # Started from a request, where the replica's event loop is surely running.
        if self._monitor_task is None or self._monitor_task.done():
            self._monitor_task = asyncio.get_running_loop().create_task(self.monitor.run())

    def _bind_loop(self) -> None:
        """Keep this (the event loop's) thread on `_loop_cpus`: tried once (a failure is logged
        once, not on every request), on the loop."""
        if self._loop_cpus:
            self._loop_bound = cpu_bind.bind_this_thread(self._loop_cpus)
            self._loop_cpus = ()

    async def submit(self, job: Job, stream: str, request: str) -> Admission:
        """Admit a request (or refuse it: the queue is full); its events go to `stream`."""
        self._bind_loop()
        self._ensure_monitor()
        return self.streams.submit(job, stream, request)

    async def stream(self, stream: str) -> AsyncIterator[Batch]:
        """One ingress replica's events, every request's, batched as they come
        (serving/api/streams.py)."""
        async for batch in self.streams.stream(stream):
            yield batch

    async def cancel(self, request: str) -> None:
        """The client went away: stop generating for it."""
        self.streams.cancel(request)

    async def counters(self) -> dict:
        """What the controller reads each period (serving/control/controller_loop.py Counters)."""
        self._ensure_monitor()
        return self.monitor.counters().model_dump()

    async def apply(self, decision: dict) -> dict:
        """Carry out a controller decision (serving/control/controller.py Decision)."""
        from serving.control.controller import Decision

        return self.monitor.apply(Decision.model_validate(decision))

    async def status(self) -> dict:
        """The controller's StatusReport (GET /v1/moe/status), or without a controller the
        engine's own figures; either way with the engine's step accounting (`efficiency`)."""
        from serving.control.controller_loop import StatusReport

        if self.controller is not None:
            report = await self.controller.status.remote()
        else:
            c = self.monitor.counters()
            report = StatusReport(
                queue_depth=c.queue_depth,
                expert_load_cv=c.expert_load_cv,
                max_over_mean=c.max_over_mean,
                step_fractions=c.step_fractions,
                measured_efficiency=c.measured_efficiency,
            ).model_dump(mode="json")
        return report | {
            "efficiency": self.monitor.efficiency(),
            "overflow": self.monitor.overflow(),
            # Which Ray node each ExpertShard runs on (shard order); empty without shards.
            "shard_nodes": list(self.pool.nodes) if self.pool is not None else [],
            "engine_node": ray.get_runtime_context().get_node_id(),
            "expert_transport": self.pool.transport_in_use if self.pool is not None else None,
            "engine_cpus": await self._forward_cpus(),
            "loop_cpus": self._loop_cpus_now(),
        }

    def _loop_cpus_now(self) -> list[int] | None:
        """The CPUs the event loop's thread is kept on, read from it (None: not kept anywhere);
        a status asked before any request binds the loop first, as that request would have."""
        self._bind_loop()
        return list(cpu_bind.allowed_cores()) if self._loop_bound else None

    async def _forward_cpus(self) -> list[int] | None:
        """The CPUs the forward thread may run on, read from it (None: not kept anywhere)."""
        if self.scheduler.forward_thread is None:
            return None
        loop = asyncio.get_running_loop()
        return list(
            await loop.run_in_executor(self.scheduler.forward_thread, cpu_bind.allowed_cores)
        )

    async def expert_shards(self) -> list:
        """The ExpertShard actor handles in use (empty without shards): for diagnostics and the
        tests' fault hooks (experts/shard.py ExpertShard.set_delay)."""
        return list(self.pool.shards) if self.pool is not None else []

    async def expert_events(self) -> list[str]:
        """The expert pool's event log (shard failures, replacements, switches), oldest first;
        empty without shards. Operators and the fault tests read it."""
        return list(self.pool.events) if self.pool is not None else []

    async def stats(self) -> dict:
        return self.scheduler.stats() | {"in_flight": self.scheduler.in_flight}

    async def drain(self) -> dict:
        """Refuse new requests (503) from now on; those in flight go on to the end, then the
        event streams to the ingress replicas close."""
        self.scheduler.draining = True
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_task(self._close_when_idle())
        return await self.stats()

    async def _close_when_idle(self) -> None:
        await self._idle()
        self.streams.close()

    async def _idle(self, within_s: float | None = None) -> None:
        """Returns once no request is in flight, or within_s has passed."""
        deadline = None if within_s is None else time.monotonic() + within_s
        while self.scheduler.in_flight and (deadline is None or time.monotonic() < deadline):
            await asyncio.sleep(0.05)

    async def retire(self) -> dict:
        """The controller removes this engine: drain it (new requests go to the other engines),
        then, its requests done or config.drain_timeout_s passed, ask Serve to stop its replica
        (serving/control/engine_scaler.py). Returns at once with the engine's stats."""
        stats = await self.drain()
        if self._retiring is None:
            self._retiring = asyncio.get_running_loop().create_task(self._stop_when_drained())
        return stats

    async def _stop_when_drained(self) -> None:
        from serving.control.engine_scaler import set_replicas

        await self._idle(self.drain_timeout_s)
        context = serve.get_replica_context()
        await asyncio.to_thread(set_replicas, context.app_name, context.deployment, 0)


@serve.deployment(name="Ingress")
@serve.ingress()
class Ingress:
    """The HTTP front: builds the FastAPI app once the replica knows its engine."""

    def __init__(self, engines: list[DeploymentHandle], config: ServeConfig) -> None:
        from serving.api.model_info import ModelInfo

        self.engines = engines
        self.config = config
        path = model_dir(config)
        named = config.model_copy(update={"served_model_name": served_name(config)})
        self.info = ModelInfo.load(path, named)

    def __serve_build_asgi_app__(self) -> Any:
        from serving.api.ingress import build_api

        several = len(self.engines) > 1
        self.choice = EngineChoice(
            [ingress_streams(engine) for engine in self.engines],
            # Those the app starts with; the controller may start the others later.
            serving=[i < self.config.engine_replicas for i in range(len(self.engines))],
            read_serving=self._read_serving if several else None,
        )
        return build_api(self.choice.generate, self._stats, self.info, self.config, self._status)

    async def _read_serving(self) -> list[bool]:
        """Which engines Serve runs a replica of now (serving/control/engine_scaler.py)."""
        from serving.control.engine_scaler import engine_states

        app_name = serve.get_replica_context().app_name
        names = engine_names(self.config)
        return [s.serving for s in await asyncio.to_thread(engine_states, app_name, names)]

    def _serving(self) -> list[DeploymentHandle]:
        self.choice.refresh_serving()  # for the next call: a health check does not wait
        mask = self.choice.serving
        return [e for e, on in zip(self.engines, mask, strict=True) if on] or self.engines[:1]

    async def _stats(self) -> dict:
        """One engine's stats; with several, the totals of those serving that answer in time
        (serving/api/engines.py `within`: the health check must not wait on a lost engine),
        each one's under `engines` (None: no answer)."""
        if len(self.engines) == 1:
            return await self.engines[0].stats.remote()
        each = await asyncio.gather(*(within(e.stats.remote()) for e in self._serving()))
        return total_stats(each)

    async def _status(self) -> dict:
        """The status of the first serving engine that answers in time (the controller's view
        covers every engine; the overflow counts are summed over all that answer), with the
        number of engines serving."""
        engines = self._serving()
        count = {"engine_replicas": len(engines), "max_engine_replicas": len(self.engines)}
        if len(engines) == 1:
            return (await engines[0].status.remote()) | count
        each = await asyncio.gather(*(within(e.status.remote()) for e in engines))
        if not any(each):  # none in time: wait on one (Serve may be starting its replica)
            each = [await engines[-1].status.remote()]
        return merged_status(each) | count


def _metrics():
    from serving.control.metrics import Metrics

    return Metrics()


def fallback_slots(config: ServeConfig, plan) -> int:
    """KV cache slots for the batch the controller's fallback may grow to (its top level, within
    the planner's memory limit); the configured slots when nothing may grow."""
    from serving.control.controller import batch_settings
    from serving.control.controller_app import controller_config

    slots = config.scheduler.max_batch_slots
    cfg = controller_config(config, plan)
    if not config.monitoring.controller or cfg.batch_strategy not in ("throughput", "adaptive"):
        return slots
    return max(slots, batch_settings(cfg, cfg.fallback.max_level).max_batch_slots)


def _start_controller(config: ServeConfig, plan):
    """The app's controller actor, with targets from the deployment's plan."""
    from serving.control.controller_app import (
        EngineScaling,
        controller_config,
        start_app_controller,
    )

    app_name = serve.get_replica_context().app_name
    gpus = 1 if config.device.startswith("cuda") else 0
    scaling = None
    if config.engines_at_most > config.engine_replicas:
        scaling = EngineScaling(config.engine_replicas, engine_ask(config),
                                config.cluster_autoscaling)  # fmt: skip
    return start_app_controller(
        controller_config(config, plan), app_name, engine_names(config), gpus, scaling
    )


def engine_env(config: ServeConfig) -> dict:
    """The engine's process environment: with ExpertShards on CPU, its idle OpenMP threads sleep
    instead of spinning after each operation, leaving the cores to the shards it waits for
    (BENCHMARKS.md, the fan-out against Ray's bare trip: 7% more tokens/ms with 2 engine threads
    beside 2 shards). An OMP_WAIT_POLICY set by the operator wins."""
    if not config.expert_shards or config.device.startswith("cuda"):
        return {}
    policy = os.environ.get("OMP_WAIT_POLICY", "PASSIVE")
    return {"runtime_env": {"env_vars": {"OMP_WAIT_POLICY": policy}}}


def application(config: ServeConfig) -> Application:
    """The bound application for `serve.run`."""
    ongoing = config.max_ongoing_requests
    # On the nodes marked for them (config.engine_resource), asking for a sliver of the marker:
    # any number of replicas fit, and none lands on a shard's node by chance.
    pinned = {"resources": {config.engine_resource: 0.001}} if config.engine_resource else {}
    ask = engine_ask(config)
    engine_pin = {"num_gpus": ask.pop("GPU", 0)} | ({"resources": ask} if ask else {})
    if config.ingress_resource:
        pinned = {"resources": {config.ingress_resource: 0.001}}
    from serving.api.shared_shards import ExpertShards

    shared = config.expert_shards and config.engines_at_most > 1
    # The shards are the owner's actors and die with its process: it sits with the ingress.
    owner_options = {"ray_actor_options": {"num_cpus": 0} | pinned}
    owner = ExpertShards.options(**owner_options).bind(config) if shared else None
    engines = [
        Engine.options(
            name=name,
            # Ray Serve's default of 5 would cap the batch (ARCHITECTURE.md section 7); our own
            # scheduler queue bounds the work, so the engine takes everything the ingress sends.
            max_ongoing_requests=ongoing,
            ray_actor_options={"num_cpus": 0} | engine_pin | engine_env(config),
            graceful_shutdown_wait_loop_s=GRACEFUL_POLL_S,
        ).bind(config, i == 0, owner)
        for i, name in enumerate(engine_names(config))
    ]
    return Ingress.options(
        max_ongoing_requests=ongoing,
        # Beyond that the proxy queues, bounded too: 503 with Retry-After, as our own queue does.
        max_queued_requests=ongoing,
        backpressure_config={"status_code": 503, "retry_after_s": config.limits.retry_after_s},
        ray_actor_options={"num_cpus": 0} | pinned,
        graceful_shutdown_wait_loop_s=GRACEFUL_POLL_S,
    ).bind(engines, config)


def run_app(config: ServeConfig, name: str = APP_NAME, route_prefix: str | None = "/") -> None:
    """Deploy the app and wait until it runs. Engines beyond config.engine_replicas start with
    no replica: the controller starts them when needed (serving/control/engine_scaler.py)."""
    from serving.control.engine_scaler import deploy

    standby = engine_names(config)[config.engine_replicas :]
    deploy(application(config), name, route_prefix, standby)


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Ray Serve's application builder: `args` are ServeConfig fields (see configs/serve.yaml).

    MOE_SERVE_API_KEY supplies the API key when `args` has none, so it need not sit in a file.
    """
    args = dict(args or {})
    if not args.get("api_key") and os.environ.get("MOE_SERVE_API_KEY"):
        args["api_key"] = os.environ["MOE_SERVE_API_KEY"]
    return application(config_from_args(args))
