"""The Ray Serve application: an HTTP ingress deployment in front of the router deployment.

    HTTP -> Ingress (FastAPI: auth, limits, validation, tokenization, SSE)
         -> Router (scheduler: continuous batching over the KV cache; the model, whose experts
            live in-process or on ExpertShard actors)

`build_app` is the builder Ray Serve's own tools call (`serve run configs/serve.yaml`, or
`serve run serving.app:build_app model=DIR`); `moe-serve up` calls `application`.
"""

from __future__ import annotations

import asyncio
import inspect
import os
from collections.abc import AsyncIterator
from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from serving.config import ServeConfig, config_from_args
from serving.errors import UserError

APP_NAME = "moe-serve"
DEMO_MODEL_NAME = "moe-serve-demo"


def model_dir(config: ServeConfig) -> str:
    """The checkpoint directory; the demo is written on the machine that asks (each replica)."""
    if config.model:
        return config.model
    from serving.demo import demo_checkpoint

    return str(demo_checkpoint())


def served_name(config: ServeConfig) -> str:
    from pathlib import Path

    if config.served_model_name:
        return config.served_model_name
    return Path(config.model).name if config.model else DEMO_MODEL_NAME


def expert_options(config: ServeConfig) -> dict[str, int]:
    """The expert-parallel options for load_model, passed only where asked for (> 0).

    Checked against load_model's signature so that `moe-serve up` fails before deploying, in one
    line, on a build whose load_model does not take them.
    """
    from serving.load import load_model

    wanted = {"expert_shards": config.expert_shards, "redundant_experts": config.redundant_experts}
    extra = {k: v for k, v in wanted.items() if v > 0}
    accepted = inspect.signature(load_model).parameters
    missing = [k for k in extra if k not in accepted]
    if missing:
        raise UserError(f"{missing[0]} is not supported by this build's load_model yet")
    return extra


def load_serving_model(config: ServeConfig):
    import torch

    from serving.load import load_model

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    options: dict = expert_options(config)
    if config.expert_shards:
        options["call_timeout_s"] = config.expert_call_timeout_s  # RayExpertPool's hang bound
        options |= dict(
            shard_cpus=config.shard_cpus,
            shard_gpus=config.shard_gpus,
            placement_timeout_s=config.placement_timeout_s,
        )
    return load_model(
        model_dir(config),
        dtype=dtypes[config.dtype],
        device=config.device,
        **options,
    )


@serve.deployment(name="Router")
class Router:
    """Holds the model and the scheduler; every running request shares its decode steps.

    It also records the router's metrics, answers the controller (`counters`, `apply`) and starts
    it (serving/controller_app.py), as configured by `config.monitoring`.
    """

    def __init__(self, config: ServeConfig) -> None:
        import torch

        from serving.controller_app import deployment_plan
        from serving.monitor import RouterMonitor
        from serving.scheduler import Scheduler
        from serving.steptime import StepAccounting
        from serving.tokenizer import TextTokenizer

        torch.set_num_threads(config.torch_threads or max(1, (os.cpu_count() or 1) - 1))
        model = load_serving_model(config)
        tokenizer = TextTokenizer(model_dir(config))
        self.scheduler = Scheduler(model, config.scheduler, decode=tokenizer.decode)
        self.scheduler.accounting = StepAccounting(config.monitoring.accounting_window_s)
        plan = deployment_plan(config, model_dir(config))  # targets and the efficiency basis
        self.monitor = RouterMonitor(
            self.scheduler,
            _metrics() if config.monitoring.metrics else None,
            on_gpu=config.device.startswith("cuda"),
            period_s=config.monitoring.period_s,
            plan=plan,
        )
        self.scheduler.observer = self.monitor.on_step
        self._monitor_task: asyncio.Task | None = None
        controller = config.monitoring.controller
        self.controller = _start_controller(config, plan) if controller else None

    def _ensure_monitor(self) -> None:
        # Started from a request, where the replica's event loop is surely running.
        if self._monitor_task is None or self._monitor_task.done():
            self._monitor_task = asyncio.get_running_loop().create_task(self.monitor.run())

    async def generate(self, job: dict) -> AsyncIterator[dict]:
        from serving.scheduler import run_job

        self._ensure_monitor()
        async for item in run_job(self.scheduler, job):
            yield item

    async def counters(self) -> dict:
        """What the controller reads each period (serving/controller_loop.py Counters)."""
        self._ensure_monitor()
        return self.monitor.counters().model_dump()

    async def apply(self, decision: dict) -> dict:
        """Carry out a controller decision (serving/controller.py Decision)."""
        from serving.controller import Decision

        return self.monitor.apply(Decision.model_validate(decision))

    async def status(self) -> dict:
        """The controller's StatusReport (GET /v1/moe/status), or without a controller the
        router's own figures; either way with the router's step accounting (`efficiency`)."""
        from serving.controller_loop import StatusReport

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
        return report | {"efficiency": self.monitor.efficiency()}

    async def expert_shards(self) -> list:
        """The ExpertShard actor handles in use (empty without shards): for diagnostics and the
        tests' fault hooks (experts/shard.py ExpertShard.set_delay)."""
        return list(getattr(self.scheduler.model.pool, "shards", []))

    async def expert_events(self) -> list[str]:
        """The expert pool's event log (shard failures, replacements, switches), oldest first;
        empty without shards. Operators and the fault tests read it."""
        return list(getattr(self.scheduler.model.pool, "events", []))

    async def stats(self) -> dict:
        return self.scheduler.stats() | {"in_flight": self.scheduler.in_flight}

    async def drain(self) -> dict:
        """Refuse new requests (503) from now on; those in flight go on to the end."""
        self.scheduler.draining = True
        return await self.stats()


@serve.deployment(name="Ingress")
@serve.ingress()
class Ingress:
    """The HTTP front: builds the FastAPI app once the replica knows its router."""

    def __init__(self, router: DeploymentHandle, config: ServeConfig) -> None:
        from serving.ingress import ModelInfo

        self.router = router
        self.config = config
        path = model_dir(config)
        named = config.model_copy(update={"served_model_name": served_name(config)})
        self.info = ModelInfo.load(path, named)

    def __serve_build_asgi_app__(self) -> Any:
        from serving.ingress import build_api

        return build_api(self._generate, self._stats, self.info, self.config, self._status)

    def _generate(self, job: dict) -> AsyncIterator[dict]:
        return self.router.options(stream=True).generate.remote(job)

    async def _stats(self) -> dict:
        return await self.router.stats.remote()

    async def _status(self) -> dict:
        return await self.router.status.remote()


def _metrics():
    from serving.metrics import Metrics

    return Metrics()


def _start_controller(config: ServeConfig, plan):
    """The app's controller actor, with targets from the deployment's plan."""
    from serving.controller_app import controller_config, start_app_controller

    app_name = serve.get_replica_context().app_name
    return start_app_controller(controller_config(config, plan), app_name)


def application(config: ServeConfig) -> Application:
    """The bound application for `serve.run`."""
    ongoing = config.max_ongoing_requests
    gpu = 1 if config.device.startswith("cuda") else 0
    router = Router.options(
        # Ray Serve's default of 5 would cap the batch (ARCHITECTURE.md section 7); our own
        # scheduler queue bounds the work, so the router takes everything the ingress sends.
        max_ongoing_requests=ongoing,
        ray_actor_options={"num_cpus": 0, "num_gpus": gpu},
    ).bind(config)
    return Ingress.options(
        max_ongoing_requests=ongoing,
        # Beyond that the proxy queues, bounded too: 503 with Retry-After, as our own queue does.
        max_queued_requests=ongoing,
        backpressure_config={"status_code": 503, "retry_after_s": config.limits.retry_after_s},
        ray_actor_options={"num_cpus": 0},
    ).bind(router, config)


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Ray Serve's application builder: `args` are ServeConfig fields (see configs/serve.yaml).

    MOE_SERVE_API_KEY supplies the API key when `args` has none, so it need not sit in a file.
    """
    args = dict(args or {})
    if not args.get("api_key") and os.environ.get("MOE_SERVE_API_KEY"):
        args["api_key"] = os.environ["MOE_SERVE_API_KEY"]
    return application(config_from_args(args))
