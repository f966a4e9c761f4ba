"""The controller actor: runs its loop in Ray, serves its status, and comes back when killed."""

from __future__ import annotations

import itertools
import os

import pytest

from serving.control.controller import ControllerConfig, PhaseTarget
from serving.control.controller_loop import Counters, start_controller
from tests.support import wait_until

pytestmark = pytest.mark.ray


def make_counters():
    tokens = itertools.count(0, 1000)  # plenty: always on target
    return lambda: Counters(tokens_generated=next(tokens), cpu_shards=1)


def make_apply():
    return lambda decision: None


def wait_for_decision(ray, actor, timeout_s: float = 30.0) -> dict:
    def decided() -> dict | None:
        status = ray.get(actor.status.remote(), timeout=timeout_s)
        if status["last_decision"] is not None and status["tokens_per_ms_per_device"]:
            return status
        return None

    return wait_until(decided, timeout_s, "a decision")


def wait_for_new_process(ray, actor, old_pid: int, timeout_s: float = 60.0) -> int:
    """The actor's pid once it differs from old_pid (calls during the restart may fail)."""

    def new_pid() -> int | None:
        try:
            pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=10)
        except ray.exceptions.RayError:
            return None  # dead or restarting: ask again
        return pid if pid != old_pid else None

    return wait_until(new_pid, timeout_s, f"a process other than pid {old_pid}")


def test_controller_actor_decides_and_survives_being_killed(ray_session):
    ray = ray_session
    config = ControllerConfig(
        period_s=0.1, phases=(PhaseTarget(name="phase 1", tokens_per_ms=0.001),)
    )
    actor = start_controller(config, make_counters, make_apply, name=f"ctl-test-{os.getpid()}")
    try:
        status = wait_for_decision(ray, actor)
        assert status["last_decision"]["action"] == "hold"
        assert status["phase"] == "phase 1" and status["devices"] == 1
        pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))
        ray.kill(actor, no_restart=False)  # as if its process died
        # The kill lands asynchronously: the old process may still answer a call or two.
        assert wait_for_new_process(ray, actor, pid) != pid
        status = wait_for_decision(ray, actor)  # Ray restarted it; it starts from scratch
        assert status["last_decision"]["action"] == "hold"
    finally:
        ray.kill(actor)
