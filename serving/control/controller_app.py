"""The controller of a deployed app: its config (planner targets for the model and hardware) and
the Ray actor that runs it against the app's Engine deployment.

The controller runs in its own actor (serving/control/controller_loop.py `ControllerActor`, restarted by
Ray when it dies), started by the Engine replica and owned by it: deleting the app stops it too.
Each period it reads the Engine's counters and sends it decisions through a Serve
DeploymentHandle (`Engine.counters`, `Engine.apply`); the Engine carries them out
(serving/control/monitor.py). With several engines (config.engine_replicas: one deployment
each) it reads every one and acts on the whole: their counters merged (`merge_counters`), a
shard action sent to the first engine (the engines share the shards, whose owner does it once),
a batch-strategy change to every engine. Where more engines may run than run now
(config.max_engine_replicas) it reads those Serve runs, and adds or removes one
(serving/control/engine_scaler.py): an engine removed drains first and stops itself (`Engine.retire`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from serving.config import ServeConfig
from serving.control.capacity import Plan
from serving.control.controller import ControllerConfig, Decision, config_from_plan
from serving.control.controller_loop import CONTROLLER_NAME, Counters, start_controller
from serving.control.engine_scaler import (
    EngineState,
    engine_states,
    next_to_add,
    set_replicas,
)

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
            running=sum(c.running for c in each),
            gpus=first.gpus + engine_gpus * (len(each) - 1),
            measured_efficiency=None if engine_gpus or None in efficiency else sum(efficiency),
            expert_load_cv=worst("expert_load_cv"),
            max_over_mean=worst("max_over_mean"),
            p99_ttft_s=worst("p99_ttft_s"),
            p99_tpot_s=worst("p99_tpot_s"),
        )
    )


@dataclass(frozen=True)
class EngineScaling:
    """What the controller needs to add and remove engines: the app's engine deployments run at
    least `floor` of them; one more asks the cluster for `ask` (Ray resources), which it has or,
    with `autoscaling`, an autoscaler will add a node for."""

    floor: int
    ask: dict[str, float]
    autoscaling: bool = False

    def room(self) -> bool:
        import ray

        if self.autoscaling:
            return True
        free = ray.available_resources()
        return all(free.get(k, 0.0) >= v for k, v in self.ask.items() if v > 0)


def _counters_reader(
    app_name: str, names: Sequence[str], engine_gpus: int, scaling: EngineScaling | None = None
) -> Callable[[], Counters]:
    engines = dict(zip(names, _engines(app_name, names), strict=True))

    def read() -> Counters:
        states = engine_states(app_name, names) if scaling is not None else None
        serving = [s.name for s in states if s.serving] if states else list(names)
        calls = [engines[n].counters.remote() for n in serving or names[:1]]  # all at once
        each = [Counters.model_validate(c.result(timeout_s=CALL_TIMEOUT_S)) for c in calls]
        merged = merge_counters(each, engine_gpus)
        if scaling is None:
            return merged
        staying = sum(not c.draining for c in each)
        return merged.model_copy(
            update=dict(
                engines=max(1, staying),
                can_add_engine=next_to_add(states) is not None and scaling.room(),
                can_remove_engine=staying > scaling.floor,
            )
        )

    return read


SHARD_ACTIONS = ("scale_out", "scale_in", "rebalance")


def _applier(
    app_name: str, names: Sequence[str], scaling: EngineScaling | None = None
) -> Callable[[Decision], None]:
    engines = dict(zip(names, _engines(app_name, names), strict=True))
    handles = list(engines.values())

    def apply(decision: Decision) -> None:
        if decision.action in ("add_engine", "remove_engine"):
            if scaling is None:
                raise RuntimeError(f"{decision.action}: the app runs a fixed number of engines")
            states = engine_states(app_name, names)
            if decision.action == "add_engine":
                _add_engine(app_name, states)
            else:
                _remove_engine(engines, states, scaling.floor)
            return
        to = handles[:1] if decision.action in SHARD_ACTIONS else handles
        calls = [engine.apply.remote(decision.model_dump(mode="json")) for engine in to]
        for call in calls:
            call.result(timeout_s=CALL_TIMEOUT_S)

    return apply


def _add_engine(app_name: str, states: Sequence[EngineState]) -> None:
    name = next_to_add(states)
    if name is None:
        raise RuntimeError("add_engine: every engine runs already")
    set_replicas(app_name, name, 1)
    log.info("engine %s asked for", name)


def _remove_engine(engines: dict, states: Sequence[EngineState], floor: int) -> None:
    """Retire the last serving engine that is not draining (never the first, the controller's):
    it refuses new requests, finishes those it has, then asks Serve to stop it."""
    serving = [s.name for s in states if s.serving][1:]
    calls = {n: engines[n].stats.remote() for n in serving}
    staying = [n for n in serving if not calls[n].result(timeout_s=CALL_TIMEOUT_S)["draining"]]
    if len(staying) + 1 <= floor or not staying:
        raise RuntimeError(f"remove_engine: no engine above the {floor} configured")
    engines[staying[-1]].retire.remote().result(timeout_s=CALL_TIMEOUT_S)
    log.info("engine %s retiring", staying[-1])


def start_app_controller(
    config: ControllerConfig,
    app_name: str,
    engines: Sequence[str] = (ENGINE_DEPLOYMENT,),
    engine_gpus: int = 0,
    scaling: EngineScaling | None = None,
):
    """Start (or find) the app's controller actor over its engine deployments `engines` (each
    holding `engine_gpus` GPUs; with `scaling`, as many run as the controller decides); factories,
    not handles, cross into it."""
    return start_controller(
        config,
        functools.partial(_counters_reader, app_name, tuple(engines), engine_gpus, scaling),
        functools.partial(_applier, app_name, tuple(engines), scaling),
        name=controller_name(app_name),
    )
