"""The controller of a deployed app: its config (planner targets for the model and hardware) and
the Ray actor that runs it against the app's Router deployment.

The controller runs in its own actor (serving/controller_loop.py `ControllerActor`, restarted by
Ray when it dies), started by the Router replica and owned by it: deleting the app stops it too.
Each period it reads the Router's counters and sends it decisions through a Serve
DeploymentHandle (`Router.counters`, `Router.apply`); the Router carries them out
(serving/monitor.py). With several Router replicas each call reaches one of them: the controller
is meant for one Router replica (the default).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path

from serving.config import ServeConfig
from serving.controller import ControllerConfig, Decision, config_from_plan, plan_for
from serving.controller_loop import CONTROLLER_NAME, Counters, start_controller

log = logging.getLogger("moe_serve.controller")

ROUTER_DEPLOYMENT = "Router"
CALL_TIMEOUT_S = 30.0


def controller_config(config: ServeConfig, model_path: str) -> ControllerConfig:
    """config.controller with the fallback's level 0 set to the scheduler's settings, and the
    planner's targets for the model and `config.hardware` (unless phases are given explicitly).
    A planning failure is logged and leaves no targets: the controller then holds."""
    s = config.scheduler
    fallback = config.controller.fallback.model_copy(
        update={
            "base_step_token_budget": s.step_token_budget,
            "base_max_batch_slots": s.max_batch_slots,
        }
    )
    base = config.controller.model_copy(update={"fallback": fallback})
    if base.phases:
        return base
    try:
        plan = plan_for(
            str(Path(model_path) / "config.json"),
            config.hardware,
            cpu_seconds=config.monitoring.cpu_measure_s,
        )
        return config_from_plan(plan, seq_len=s.max_seq_len, base=base)
    except Exception as exc:  # a bad profile must not stop serving; the reason is in the log
        log.error("controller: no planner targets (%s); it will hold", exc)
        return base


def controller_name(app_name: str) -> str:
    return f"{CONTROLLER_NAME}:{app_name}"


def _router(app_name: str):
    from ray import serve

    return serve.get_deployment_handle(ROUTER_DEPLOYMENT, app_name=app_name)


def _counters_reader(app_name: str) -> Callable[[], Counters]:
    router = _router(app_name)

    def read() -> Counters:
        data = router.counters.remote().result(timeout_s=CALL_TIMEOUT_S)
        return Counters.model_validate(data)

    return read


def _applier(app_name: str) -> Callable[[Decision], None]:
    router = _router(app_name)

    def apply(decision: Decision) -> None:
        router.apply.remote(decision.model_dump(mode="json")).result(timeout_s=CALL_TIMEOUT_S)

    return apply


def start_app_controller(config: ControllerConfig, app_name: str):
    """Start (or find) the app's controller actor; factories, not handles, cross into it."""
    return start_controller(
        config,
        functools.partial(_counters_reader, app_name),
        functools.partial(_applier, app_name),
        name=controller_name(app_name),
    )
