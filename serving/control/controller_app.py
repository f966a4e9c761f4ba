"""The controller of a deployed app: its config (planner targets for the model and hardware) and
the Ray actor that runs it against the app's Engine deployment.

The controller runs in its own actor (serving/control/controller_loop.py `ControllerActor`, restarted by
Ray when it dies), started by the Engine replica and owned by it: deleting the app stops it too.
Each period it reads the Engine's counters and sends it decisions through a Serve
DeploymentHandle (`Engine.counters`, `Engine.apply`); the Engine carries them out
(serving/control/monitor.py). With several Engine replicas each call reaches one of them: the controller
is meant for one Engine replica (the default).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
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


def _engine(app_name: str):
    from ray import serve

    return serve.get_deployment_handle(ENGINE_DEPLOYMENT, app_name=app_name)


def _counters_reader(app_name: str) -> Callable[[], Counters]:
    engine = _engine(app_name)

    def read() -> Counters:
        data = engine.counters.remote().result(timeout_s=CALL_TIMEOUT_S)
        return Counters.model_validate(data)

    return read


def _applier(app_name: str) -> Callable[[Decision], None]:
    engine = _engine(app_name)

    def apply(decision: Decision) -> None:
        engine.apply.remote(decision.model_dump(mode="json")).result(timeout_s=CALL_TIMEOUT_S)

    return apply


def start_app_controller(config: ControllerConfig, app_name: str):
    """Start (or find) the app's controller actor; factories, not handles, cross into it."""
    return start_controller(
        config,
        functools.partial(_counters_reader, app_name),
        functools.partial(_applier, app_name),
        name=controller_name(app_name),
    )
