"""Cores of its own for a CPU engine's forward pass (serving/engine/cpu_bind.py): which cores,
when `moe-serve up` splits them, and that a bound thread really runs there."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from serving.cli.command import build_parser
from serving.cli.up import resolve_config
from serving.config import ServeConfig
from serving.engine import cpu_bind
from serving.engine.cpu_bind import CoreSplit, split_cores, split_for

pytestmark = pytest.mark.skipif(not cpu_bind.allowed_cores(), reason="no CPU affinity here")


@pytest.mark.parametrize(
    ("allowed", "threads", "split"),
    [
        ([0, 1], 1, CoreSplit((0,), (1,))),
        ([3, 1, 2, 0], 2, CoreSplit((0, 1), (2, 3))),
        ([4, 6, 9], 1, CoreSplit((4,), (6, 9))),
        ([0], 1, None),  # nothing left for Ray and Serve
        ([0, 1], 2, None),
        ([0, 1], 0, None),
    ],
)
def test_the_engine_takes_the_first_cores_and_leaves_the_rest_at_least_one(allowed, threads, split):
    assert split_cores(allowed, threads) == split


def test_up_splits_only_for_one_engine_holding_its_experts_on_a_cpu():
    two = [0, 1]
    if list(cpu_bind.allowed_cores()) != two:
        pytest.skip("the cases below are written for a 2-CPU machine")
    assert split_for(ServeConfig(), 1) == CoreSplit((0,), (1,))
    for off in (
        ServeConfig(bind_cpus=False),
        ServeConfig(expert_shards=2),
        ServeConfig(engine_replicas=2),
        ServeConfig(max_engine_replicas=2),
        ServeConfig(device="cuda:0"),
        ServeConfig(engine_cpus=(1,)),  # given: the forward pass alone is bound, nothing moved
    ):
        assert split_for(off, 1) is None, off


def test_no_bind_cpus_flag_and_yaml_field_turn_it_off():
    assert resolve_config(build_parser().parse_args(["up"])).bind_cpus is True
    assert resolve_config(build_parser().parse_args(["up", "--no-bind-cpus"])).bind_cpus is False


def test_the_event_loop_joins_a_forward_pass_on_one_core_only():
    # One core: the loop's work between forward passes waits for nothing else there. Several:
    # torch's threads run the forward pass there, and the loop would interrupt them.
    assert cpu_bind.loop_cores((1,)) == (1,)
    assert cpu_bind.loop_cores((0, 1)) == ()
    assert cpu_bind.loop_cores(()) == ()


def test_a_bound_thread_runs_on_its_cores_and_others_do_not_follow():
    core = cpu_bind.allowed_cores()[-1]
    before = cpu_bind.allowed_cores()
    pool = cpu_bind.bound_thread([core])
    try:
        assert pool.submit(cpu_bind.allowed_cores).result() == (core,)
        assert cpu_bind.allowed_cores() == before  # the caller's thread is left as it was
        # A thread the bound one starts inherits its cores (torch's OpenMP threads do).
        child = pool.submit(lambda: _in_new_thread(cpu_bind.allowed_cores)).result()
        assert child == (core,)
    finally:
        pool.shutdown()


def test_binding_to_a_cpu_that_does_not_exist_is_logged_not_raised(caplog):
    assert cpu_bind.bind_this_thread([100_000]) is False
    assert "could not keep this thread on CPUs [100000]" in caplog.text


def test_the_scheduler_runs_its_forward_passes_on_the_thread_it_is_given(demo_path):
    from serving import load_model
    from serving.config import SchedulerConfig
    from serving.engine.sampling import SamplingParams
    from serving.engine.scheduler import Scheduler

    class Counted(ThreadPoolExecutor):
        calls = 0

        def submit(self, *args, **kwargs):
            Counted.calls += 1
            return super().submit(*args, **kwargs)

    scheduler = Scheduler(load_model(demo_path), SchedulerConfig(max_batch_slots=2))
    scheduler.forward_thread = Counted(1)

    async def one() -> list[int]:
        seq = scheduler.submit([1, 5, 9], SamplingParams(max_tokens=3))
        return [e.token async for e in scheduler.stream(seq)]

    try:
        assert len(asyncio.run(one())) == 3
        assert Counted.calls >= 3  # a prefill and two decode steps, at least
    finally:
        scheduler.forward_thread.shutdown()


def _in_new_thread(fn):
    out = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join()
    return out[0]
