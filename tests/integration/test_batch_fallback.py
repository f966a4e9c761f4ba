"""Scenario (c): the batch fallback, live. The demo model in one process (no shard to add), a
throughput target out of reach, a shallow queue: the controller falls back to bigger batches and
the clients' throughput at the same offered load rises; when the fallback breaks a latency bound,
the controller reverts it and latency recovers. Before and after come from the same run."""

from __future__ import annotations

import statistics
import time

import pytest

from serving.config import (
    FallbackConfig,
    MonitoringConfig,
    PhaseTarget,
    SchedulerConfig,
)
from serving.control.controller import ControllerConfig

from ..support import Load, moe_status, wait_healthy, wait_until
from .test_controller_live import KEY, demo_app

pytestmark = pytest.mark.ray

TOKENS = 16  # per request: every completion is the same work
# The throughput test's requests are longer: each request also costs work that batching does not
# share (HTTP, the ingress, streaming); with more decode steps per request the steps, which the
# fallback batches, weigh more (at 16 tokens, one core busy: 1.29-1.54x).
LONG_TOKENS = 48
# Level 0: 2 slots; each level doubles slots and step budget.
SCHEDULER = SchedulerConfig(max_batch_slots=2, max_seq_len=128, step_token_budget=64, max_queue=32)
MONITORING = MonitoringConfig(period_s=1.0, cpu_measure_s=0.3)


def controller(**fields) -> ControllerConfig:
    """Fast periods; a target far out of reach, so that only the fallback can answer the
    shortfall (no shards to add or remove); latency bounds as given."""
    base = dict(
        period_s=1.0,
        window_s=4.0,
        phases=(PhaseTarget(name="out-of-reach", tokens_per_ms=1000.0),),
        batch_strategy="adaptive",
        confirm_periods=4,
        cooldown_periods=2,
        max_p99_ttft_s=None,
        max_p99_tpot_s=None,
    )
    return ControllerConfig(**(base | fields))


def actions(url: str) -> list[dict]:
    return moe_status(url, KEY)["actions"]


def unix_to_monotonic(t: float) -> float:
    return t - time.time() + time.monotonic()


def test_fallback_at_a_shallow_queue_raises_throughput_at_the_same_load(serve_http, demo_path):
    config = controller(fallback=FallbackConfig(max_level=2, batch_wait_ms_per_level=0.0))
    with demo_app(serve_http, demo_path, "moe-fallback-up", expert_shards=0,
                  scheduler=SCHEDULER, monitoring=MONITORING, controller=config) as (url, engine):  # fmt: skip
        # 8 clients, 2 slots: 6 wait, below the deep-queue mark (8): a shallow queue.
        with Load(url, KEY, clients=8, max_tokens=LONG_TOKENS, timeout_s=120.0) as load:
            wait_until(lambda: len(actions(url)) >= 2, 120, "two fallback levels", interval_s=1.0)
            done = actions(url)
            first, second = (unix_to_monotonic(a["time"]) for a in done[:2])
            wait_until(lambda: time.monotonic() > second + 6.0, 30, "a window at level 2")
            after_end = time.monotonic()
            load.wait_ok(8)  # the window's requests have ended
        stats = wait_healthy(url)["scheduler"]
    assert [a["action"] for a in done[:2]] == ["batch_fallback", "batch_fallback"], done
    assert all("shallow" in a["reason"] for a in done[:2]), done
    assert stats["slot_limit"] == 8 and stats["step_token_budget"] == 256
    before = load.rate(first - 4.0, first)  # completions/s at level 0, just before acting
    after = load.rate(second + 2.0, after_end)  # at level 2, once its batches formed
    print(f"completions/s: level 0 {before:.2f}, level 2 {after:.2f}")
    assert after > 1.3 * before, (before, after)  # 4x the rows per step (1.5-1.8x measured)
    assert not load.failed, load.failed[:3]


def test_a_fallback_that_breaks_latency_is_reverted(serve_http, demo_path):
    # Level 1 waits 400 ms for company in every step that has room: with 3 clients and 4 slots
    # there always is, so each token takes >= 0.4 s, over the 0.25 s p99 TPOT bound.
    config = controller(
        fallback=FallbackConfig(max_level=1, batch_wait_ms_per_level=400.0),
        max_p99_tpot_s=0.25,
        confirm_periods=2,
    )
    with demo_app(serve_http, demo_path, "moe-fallback-revert", expert_shards=0,
                  scheduler=SCHEDULER, monitoring=MONITORING, controller=config) as (url, _):  # fmt: skip
        with Load(url, KEY, clients=3, max_tokens=TOKENS, timeout_s=120.0) as load:
            wait_until(lambda: len(actions(url)) >= 2, 120, "a fallback and its revert",
                       interval_s=1.0)  # fmt: skip
            done = actions(url)
            fell, reverted = (unix_to_monotonic(a["time"]) for a in done[:2])
            wait_until(
                lambda: sum(a >= reverted + 1.0 for a, _ in load.done) >= 6,
                60,
                "6 requests sent after the revert",
            )
        final = actions(url)
        stats = wait_healthy(url)["scheduler"]
    assert [a["action"] for a in done[:2]] == ["batch_fallback", "revert_fallback"], done
    assert "TPOT" in done[1]["reason"], done[1]
    assert stats["slot_limit"] == 2  # back at level 0
    assert len(final) == 2, final  # and it did not climb to the level that broke latency again

    # The slowest request that ended while level 1 was in force (or just after, finishing its
    # slowed tokens), against the typical one sent after the revert.
    slowed = max(b - a for a, b in load.done if fell < b <= reverted + 2.0)
    recovered = statistics.median(b - a for a, b in load.done if a >= reverted + 1.0)
    print(f"seconds per request: slowed {slowed:.2f}, after the revert {recovered:.2f}")
    assert recovered < 0.5 * slowed, (slowed, recovered)  # the 0.4 s waits are gone
    assert not load.failed, load.failed[:3]
