"""Engine replicas that the controller starts and stops, through Ray Serve's external scaler.

Each engine is a deployment of its own with at most one replica (serving/api/engines.py). The app
holds config.engines_at_most of them; those beyond config.engine_replicas are set to no replica
as soon as the app is deployed (`deploy`). The controller adds an engine by setting the first
idle one to one replica, and removes the last one, drained first, by setting it back to none
(serving/control/controller_app.py). Ray Serve changes only that deployment's replica count
(no other replica restarts) for an app deployed with `external_scaler_enabled`; Serve's own
autoscaling is then off for the app, the controller being its autoscaler.

The calls are the ones Serve's REST endpoint for this (POST /api/v1/applications/{app}/
deployments/{name}/scale) makes to the Serve controller actor, made here directly: Ray's
dashboard need not run, nor be reachable, for the controller to scale.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from serving.errors import UserError

CALL_TIMEOUT_S = 10.0
RUNNING = "RUNNING"


@dataclass(frozen=True)
class EngineState:
    """One engine deployment as Serve has it."""

    name: str
    target: int  # replicas Serve is asked to run
    running: int  # replicas up and serving

    @property
    def serving(self) -> bool:
        """Up and meant to be: requests may go to it."""
        return self.target > 0 and self.running > 0


def _serve_controller():
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    return ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)


def engine_states(app_name: str, names: Sequence[str]) -> list[EngineState]:
    """Each engine's target and running replicas, in `names` order (0, 0 for one Serve does not
    list). Blocking: call it off an event loop."""
    import ray

    details = ray.get(
        _serve_controller().get_serve_instance_details.remote(), timeout=CALL_TIMEOUT_S
    )
    deployments = details.get("applications", {}).get(app_name, {}).get("deployments", {})
    states = []
    for name in names:
        d = deployments.get(name, {})
        running = sum(r.get("state") == RUNNING for r in d.get("replicas", []))
        states.append(EngineState(name, int(d.get("target_num_replicas", 0)), running))
    return states


def set_replicas(app_name: str, name: str, replicas: int) -> None:
    """Ask Serve for `replicas` replicas of the engine deployment `name` (0 or 1)."""
    import ray
    from ray.serve._private.common import DeploymentID

    deployment = DeploymentID(name=name, app_name=app_name)
    ray.get(
        _serve_controller().update_deployment_replicas.remote(deployment, replicas),
        timeout=CALL_TIMEOUT_S,
    )


def next_to_add(states: Sequence[EngineState]) -> str | None:
    """The first engine with no replica asked for; None when all are."""
    return next((s.name for s in states if s.target == 0), None)


def deploy(app, app_name: str, route_prefix: str | None, standby: Sequence[str]) -> None:
    """serve.run for an app whose `standby` engines start with no replica.

    Serve refuses num_replicas=0 at deploy time, so the app is created without waiting for it to
    run, the standby engines set to 0 at once (the Serve controller has then, as measured, not
    started their replicas yet; one it had would be stopped), and then waited for.
    """
    from ray import serve

    if not standby:
        serve.run(app, name=app_name, route_prefix=route_prefix, blocking=False)
        return
    try:
        target = serve.RunTarget(app, name=app_name, route_prefix=route_prefix,
                                 external_scaler_enabled=True)  # fmt: skip
    except (AttributeError, TypeError) as exc:
        raise UserError(
            "max_engine_replicas needs a Ray Serve with its external scaler (Ray 2.60 has it)"
        ) from exc
    serve.run_many([target], wait_for_applications_running=False)
    for name in standby:
        set_replicas(app_name, name, 0)
    _wait_running(app_name)


def _wait_running(app_name: str, poll_s: float = 0.2) -> None:
    from ray import serve

    while True:
        status = serve.status().applications.get(app_name)
        if status is not None and status.status == "RUNNING":
            return
        if status is not None and status.status == "DEPLOY_FAILED":
            raise RuntimeError(f"the app failed to deploy: {status.message}")
        time.sleep(poll_s)
