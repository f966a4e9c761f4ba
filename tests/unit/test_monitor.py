"""The engine's monitoring without Ray: counters for the controller, metrics per step, and
decisions carried out on the expert pool and the scheduler."""

from __future__ import annotations

from collections import deque
from types import SimpleNamespace

import pytest

from router.balancer import LayerStats, OverflowCounts
from serving.control import monitor
from serving.control.controller import BatchSettings, Decision
from serving.control.monitor import EngineMonitor, p99
from serving.engine.reports import RequestTiming, StepReport


class FakeMetrics:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []

    def __getattr__(self, name):
        return lambda *args, **kw: self.calls.append((name, kw or dict(enumerate(args))))


class FakeBalancer:
    def stats(self):
        return [LayerStats(0.1, 1.2, 0, 0, 3, 90), LayerStats(0.4, 1.9, 0, 0, 3, 90)]

    def counters(self):
        return [OverflowCounts(2, 1, 0), OverflowCounts(3, 0, 0)]

    num_layers = 2

    def placement(self, layer):
        return None

    def tokens_per_expert(self):
        return None


class FakePool:
    def __init__(self, shards: int) -> None:
        self.num_shards, self.device, self.balancer = shards, "cpu", FakeBalancer()
        self.redundant = 0
        self.calls: list[str] = []

    def _call(self, name):
        self.calls.append(name)
        return SimpleNamespace(is_alive=lambda: False)

    def add_shard(self):
        return self._call("add_shard")

    def remove_shard(self):
        return self._call("remove_shard")

    def rebalance(self):
        return self._call("rebalance")


class FakeScheduler:
    def __init__(self) -> None:
        self.tokens_generated, self.tokens_processed, self.queue_depth = 42, 50, 2
        self.running, self.slot_limit, self.draining = [object()] * 3, 8, False
        self.batches: list[tuple[int, int]] = []

    def set_batch(self, budget: int, slots: int, wait_ms: float | None = None) -> dict:
        self.batches.append((budget, slots, wait_ms))
        return {"step_token_budget": budget, "max_batch_slots": slots}


def step(finished=()) -> StepReport:
    return StepReport(
        batch_tokens=10, new_tokens=2, queue_depth=2, slots_used=2, slots=8, finished=finished
    )


def test_each_step_is_recorded_and_the_balancer_read_each_period():
    m, pool = FakeMetrics(), FakePool(2)
    mon = EngineMonitor(FakeScheduler(), pool, m, on_gpu=False, period_s=3600)
    mon.on_step(step((RequestTiming(0.1, 0.5, 0.02), RequestTiming(0.2, 0.2, None))))
    names = [n for n, _ in m.calls]
    assert names.count("record_step") == 1 and names.count("record_request") == 2
    assert (
        "record_step",
        {"batch_tokens": 10, "queue_depth": 2, "kv_cache_usage": 0.25},
    ) in m.calls
    assert ("record_overflow_totals", {0: 5, 1: 1, 2: 0}) in m.calls
    assert ("record_load", {"cv": 0.4, "max_over_mean": 1.9}) in m.calls  # the worst layer
    mon.on_step(step())  # within the period: no second balancer reading
    assert [n for n, _ in m.calls].count("record_overflow_totals") == 1


def test_counters_for_the_controller(monkeypatch):
    monkeypatch.setattr(EngineMonitor, "_room_for_shard", lambda self: True)
    monkeypatch.setattr(monitor, "placement_gain", lambda *_: (0.4, 0.1))  # CV now, placed afresh
    mon = EngineMonitor(FakeScheduler(), FakePool(2), None, on_gpu=False)
    mon.on_step(step((RequestTiming(0.1, 0.5, 0.02),)))
    c = mon.counters()
    assert (c.tokens_generated, c.gpus, c.cpu_shards, c.queue_depth) == (42, 0, 2, 2)
    assert c.expert_load_cv == 0.4 and c.max_over_mean == 1.9
    assert c.p99_ttft_s == pytest.approx(0.1) and c.p99_tpot_s == pytest.approx(0.02)
    assert c.can_scale_out and c.can_scale_in and c.can_rebalance
    assert (c.running, c.engine_slots) == (3, 8)  # what the engine-replica rules weigh
    local = EngineMonitor(FakeScheduler(), None, None, on_gpu=True).counters()
    assert (local.gpus, local.cpu_shards, local.expert_load_cv) == (1, 0, None)
    assert not (local.can_scale_out or local.can_scale_in or local.can_rebalance)
    assert p99(deque()) is None


def test_no_rebalance_is_offered_where_no_placement_would_even_the_load(monkeypatch):
    monkeypatch.setattr(EngineMonitor, "_room_for_shard", lambda self: True)
    # The best placement barely helps: rebalancing would churn.
    monkeypatch.setattr(monitor, "placement_gain", lambda *_: (0.4, 0.35))
    pool = FakePool(2)
    mon = EngineMonitor(FakeScheduler(), pool, None, on_gpu=False)
    mon.on_step(step())
    assert not mon.counters().can_rebalance


@pytest.mark.parametrize(
    "action,call",
    [("scale_out", "add_shard"), ("scale_in", "remove_shard"), ("rebalance", "rebalance")],
)
def test_shard_actions_go_to_the_pool(action, call):
    pool = FakePool(2)
    EngineMonitor(FakeScheduler(), pool, None, on_gpu=False).apply(
        Decision(action=action, reason="r")
    )
    assert pool.calls == [call]


def test_batch_actions_go_to_the_scheduler_and_no_shards_refuses():
    sched = FakeScheduler()
    mon = EngineMonitor(sched, None, None, on_gpu=False)
    batch = BatchSettings(level=1, step_token_budget=1024, max_batch_slots=32, batch_wait_ms=5)
    done = mon.apply(Decision(action="batch_fallback", reason="r", batch=batch))
    assert sched.batches == [(1024, 32, 5)] and done["level"] == 1  # the wait applied too
    with pytest.raises(RuntimeError, match="expert_shards"):
        mon.apply(Decision(action="scale_out", reason="r"))
