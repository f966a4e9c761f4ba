"""The controller of a deployed app: its config (planner targets for the model and hardware) and
the Ray actor that runs it against the app's Engine deployment.

The controller runs in its own actor (serving/control/controller_loop.py `ControllerActor`, restarted by
Ray when it dies), started by the Engine replica and owned by it: deleting the app stops it too.
Each period it reads the Engine's counters and sends it decisions through a Serve
DeploymentHandle (`Engine.counters`, `Engine.apply`); the Engine carries them out
(serving/control/monitor.py). With several engines (config.engine_replicas: one deployment
each) it reads every one and acts on the whole: their counters merged (`merge_counters`), a
shard action sent to the first engine (the engines share the shards, whose owner does it once),
a batch-strategy change to every engine.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from serving.config import ServeConfig
from serving.control.capacity import Plan
from serving.control.controller import ControllerConfig, Decision, config_from_plan
from serving.control.controller_loop import CONTROLLER_NAME, Counters, start_controller

log = logging.getLogger("moe_serve.controller")

ENGINE_DEPLOYMENT = "Engine"
CALL_TIMEOUT_S = 30.0


def deployment_plan(config: ServeConfig, model_path: str) -> Plan | None:
    """The plan for the model on `config.hardware` (`cpu` is measured now), with the factors
    measured in `config.calibration` where given (serving/control/calibrate.py). A failure is logged and
    gives None: serving goes on, the controller holds, the measured factors are not computed."""
    from serving.control import capacity
    from serving.control.calibrate import calibrated_options, load_calibration, prediction
    from serving.control.specs import load_hardware_spec, load_model_spec

    try:
        spec = load_model_spec(str(Path(model_path) / "config.json"))
        hardware = load_hardware_spec(config.hardware, seconds=config.monitoring.cpu_measure_s)
        options = capacity.PlanOptions()
        if config.calibration:
            cal = load_calibration(config.calibration)
            predicted = prediction(cal, hardware, flops_per_token=2.0 * spec.params().active)
            options = calibrated_options(options, predicted, config.calibration)
        return capacity.plan(spec, hardware, options)
    except Exception as exc:  # a bad profile or report must not stop serving; it is logged
        log.error("no plan for %s on %s (%s)", model_path, config.hardware, exc)
        return None


def controller_config(config: ServeConfig, plan: Plan | None) -> ControllerConfig:
    """config.controller with the fallback's level 0 set to the scheduler's settings, and the
    plan's targets (unless phases are given explicitly). Without a plan there are no targets:
    the controller then holds."""
    s = config.scheduler
    fallback = config.controller.fallback.model_copy(
        update={
            "base_step_token_budget": s.step_token_budget,
            "base_max_batch_slots": s.max_batch_slots,
        }
    )
    base = config.controller.model_copy(update={"fallback": fallback})
    if base.phases or plan is None:
        return base
    return config_from_plan(plan, seq_len=s.max_seq_len, base=base)


def controller_name(app_name: str) -> str:
    return f"{CONTROLLER_NAME}:{app_name}"


def _engines(app_name: str, names: Sequence[str]) -> list:
    from ray import serve

    return [serve.get_deployment_handle(name, app_name=app_name) for name in names]


def merge_counters(each: Sequence[Counters], engine_gpus: int = 0) -> Counters:
    """Several engines' counters as one app's: tokens and queues summed, the worst load and
    latency taken. The shards are shared, so their GPUs are counted once (the first engine's
    count holds them and its own `engine_gpus`). Each engine's efficiency is its tokens over the
    same devices: they add up when the engines hold no GPU; else unknown (None). The step
    breakdown is the first engine's."""
    first = each[0]
    if len(each) == 1:
        return first

    def worst(field: str) -> float | None:
        values = [getattr(c, field) for c in each if getattr(c, field) is not None]
        return max(values) if values else None

    processed = [c.tokens_processed for c in each]
    efficiency = [c.measured_efficiency for c in each]
    return first.model_copy(
        update=dict(
            tokens_generated=sum(c.tokens_generated for c in each),
            tokens_processed=None if None in processed else sum(processed),
            queue_depth=sum(c.queue_depth for c in each),
            gpus=first.gpus + engine_gpus * (len(each) - 1),
            measured_efficiency=None if engine_gpus or None in efficiency else sum(efficiency),
            expert_load_cv=worst("expert_load_cv"),
            max_over_mean=worst("max_over_mean"),
            p99_ttft_s=worst("p99_ttft_s"),
            p99_tpot_s=worst("p99_tpot_s"),
        )
    )


def _counters_reader(
    app_name: str, names: Sequence[str], engine_gpus: int
) -> Callable[[], Counters]:
    engines = _engines(app_name, names)

    def read() -> Counters:
        calls = [engine.counters.remote() for engine in engines]  # all at once
        each = [Counters.model_validate(c.result(timeout_s=CALL_TIMEOUT_S)) for c in calls]
        return merge_counters(each, engine_gpus)

    return read


SHARD_ACTIONS = ("scale_out", "scale_in", "rebalance")


def _applier(app_name: str, names: Sequence[str]) -> Callable[[Decision], None]:
    engines = _engines(app_name, names)

    def apply(decision: Decision) -> None:
        to = engines[:1] if decision.action in SHARD_ACTIONS else engines
        calls = [engine.apply.remote(decision.model_dump(mode="json")) for engine in to]
        for call in calls:
            call.result(timeout_s=CALL_TIMEOUT_S)

    return apply


def start_app_controller(
    config: ControllerConfig,
    app_name: str,
    engines: Sequence[str] = (ENGINE_DEPLOYMENT,),
    engine_gpus: int = 0,
):
    """Start (or find) the app's controller actor over its engine deployments `engines` (each
    holding `engine_gpus` GPUs); factories, not handles, cross into it."""
    return start_controller(
        config,
        functools.partial(_counters_reader, app_name, tuple(engines), engine_gpus),
        functools.partial(_applier, app_name, tuple(engines)),
        name=controller_name(app_name),
    )
