"""The engine's monitoring: what it records (metrics, the step accounting), what it tells the
controller (counters), and how it carries out the controller's decisions (apply).

It sees the engine through a narrow interface: the scheduler's step reports (`on_step`, called
after every step, on the event loop and between two forward passes, so reading the expert pool's
balancer there races with nothing), its token counters and queue, and `set_batch`; and, with
expert shards, the `ElasticPool` it is handed. Cheap figures (step tokens, queue, KV cache use,
request latencies) are recorded every step, and every step's time goes into the step accounting
(serving/control/steptime.py); the balancer's overflow totals and load evenness, and the
step-time breakdown with the measured efficiency factors (serving/control/efficiency.py), every
`period_s`. `run()` re-sets the gauges every period so that none expires while the server is idle
(Ray drops a gauge ~30 s after its last set).

Live tokens/ms, targets, phase and controller actions are recorded by the controller itself
(serving/control/controller_loop.py) in its own process, from the counters this module hands it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from typing import Any, Protocol

import numpy as np

from experts.pool import ElasticPool
from router.placement import placement_gain
from serving.control.capacity import Plan
from serving.control.controller import Decision, devices_in_use
from serving.control.controller_loop import Counters
from serving.control.efficiency import EfficiencyBasis, Measured, basis_from_plan, measure
from serving.control.steptime import StepAccounting
from serving.engine.reports import StepReport

log = logging.getLogger("moe_serve.monitor")

RECENT_REQUESTS = 512  # requests the p99 latencies are taken over
# A rebalance must cut the predicted load CV across shards by at least this share (_rebalance_helps).
REBALANCE_MIN_GAIN = 0.2


def p99(values: deque[float]) -> float | None:
    return float(np.percentile(np.fromiter(values, float), 99)) if values else None


class Engine(Protocol):
    """What the monitor reads and changes of the engine (serving/engine/scheduler.py)."""

    tokens_generated: int  # cumulative sampled tokens
    tokens_processed: int  # cumulative prompt + decode tokens run
    running: list  # the sequences in the batch now
    slot_limit: int  # batch slots in use now (the fallback may raise it)
    draining: bool  # refusing new requests: being stopped

    @property
    def queue_depth(self) -> int: ...

    def set_batch(
        self, step_token_budget: int, max_batch_slots: int, batch_wait_ms: float | None = None
    ) -> dict: ...


class EngineMonitor:
    """One per Engine replica. `pool` is the expert pool on shards (None: experts in the
    engine's process); `metrics` a serving.control.metrics.Metrics, or None (not recorded)."""

    def __init__(
        self,
        engine: Engine,
        pool: ElasticPool | None,
        metrics: Any | None,
        on_gpu: bool,
        period_s: float = 5.0,
        plan: Plan | None = None,
        accounting_window_s: float = 30.0,
        cluster_autoscaling: bool = False,
    ) -> None:
        self.engine, self.pool, self.metrics, self.on_gpu = engine, pool, metrics, on_gpu
        self.period_s = period_s
        self.accounting = StepAccounting(accounting_window_s)
        self.plan = plan  # the deployment's plan: the basis of the measured factors
        self.ttft: deque[float] = deque(maxlen=RECENT_REQUESTS)
        self.tpot: deque[float] = deque(maxlen=RECENT_REQUESTS)
        self.load: tuple[float | None, float | None] = (None, None)  # worst layer: CV, max/mean
        # None: never read. The first step reads at once (monotonic() counts from boot, so a
        # clock started at 0 would wait for a period after boot).
        self._last_slow: float | None = None
        self._reconfig = None  # the pool's reconfiguration thread in flight, if any
        self.cluster_autoscaling = cluster_autoscaling  # room can be made: see _room_for_shard
        # The last scale-out: (pool events before it, cluster total of the shard's resource); and
        # the total at which an autoscaler last had no room (None: never).
        self._scale_out_from: tuple[int, float] | None = None
        self._autoscaler_full_at: float | None = None

    @property
    def shards(self) -> int:
        """ExpertShard actors in use (0: experts in the engine's process)."""
        return self.pool.num_shards if self.pool is not None else 0

    # -- recording -------------------------------------------------------------------------------

    def on_step(self, report: StepReport) -> None:
        """The scheduler's observer: runs after every step."""
        self.accounting.record(report.interval_s, report.forward_s, report.expert,
                               report.decode_rows, report.prefill_tokens,
                               report.prefill_chunks)  # fmt: skip
        for t in report.finished:
            self.ttft.append(t.ttft_s)
            if t.tpot_s is not None:
                self.tpot.append(t.tpot_s)
        if self.metrics is not None:
            self.metrics.record_step(
                batch_tokens=report.batch_tokens,
                queue_depth=report.queue_depth,
                kv_cache_usage=report.slots_used / report.slots,
            )
            for t in report.finished:
                self.metrics.record_request(ttft_s=t.ttft_s, e2e_s=t.e2e_s, tpot_s=t.tpot_s)
        now = time.monotonic()
        if self._last_slow is None or now - self._last_slow >= self.period_s:
            self._last_slow = now
            self._read_balancer()
            self._read_accounting()

    def _read_balancer(self) -> None:
        """Overflow totals and the worst layer's load evenness (only with expert shards)."""
        if self.pool is None:
            return
        balancer = self.pool.balancer
        stats = balancer.stats()
        worst = max(stats, key=lambda s: s.cv_shards, default=None)
        if worst is not None and worst.batches > 0:
            self.load = (worst.cv_shards, worst.max_over_mean_shards)
        if self.metrics is not None:
            totals = balancer.counters()
            self.metrics.record_overflow_totals(
                sum(c.split for c in totals),
                sum(c.rerouted for c in totals),
                sum(c.dropped for c in totals),
            )
            self.metrics.record_load(cv=self.load[0], max_over_mean=self.load[1])

    def _read_accounting(self) -> None:
        if self.metrics is None:
            return
        fractions, measured = self.window()
        if fractions is not None:
            factors = dict(measured.factors) if measured else None
            efficiency = measured.efficiency if measured else None
            self.metrics.record_efficiency(fractions, efficiency, factors)

    def overflow(self) -> dict | None:
        """The overflow policy and each layer's cumulative counts (None without shards)."""
        if self.pool is None:
            return None
        balancer = self.pool.balancer
        layers = [dict(vars(c)) for c in balancer.counters()]
        return {"policy": balancer.overflow, "layers": layers}

    def window(self) -> tuple[dict[str, float] | None, Measured | None]:
        """The recent window's step-time fractions, and its measured factors where the
        deployment has a plan; (None, None) without steps in the window."""
        window, basis = self.accounting.window(), self._basis()
        return window.fractions(), measure(window, basis) if basis else None

    def _basis(self) -> EfficiencyBasis | None:
        return basis_from_plan(self.plan, self.devices()) if self.plan else None

    def efficiency(self) -> dict:
        """The `efficiency` section of GET /v1/moe/status: cumulative totals (a benchmark diffs
        two readings), the basis, the recent window measured, and the plan's assumptions."""
        fractions, measured = self.window()
        plan = self.plan
        return {
            "totals": self.accounting.totals.to_json(),
            "basis": basis.model_dump() if (basis := self._basis()) else None,
            "window_s": self.accounting.window_s,
            "fractions": fractions,
            "measured": measured.model_dump() if measured else None,
            "planned": {
                "factors": dict(plan.efficiency_factors),
                "sources": plan.efficiency_factor_sources,
                "efficiency": plan.efficiency,
            }
            if plan
            else None,
        }

    async def run(self) -> None:
        """Re-set the gauges every period; never dies."""
        while True:
            await asyncio.sleep(self.period_s)
            try:
                if self.metrics is not None:
                    self.metrics.refresh()
            except Exception:
                log.exception("refreshing metrics failed; continuing")

    # -- the controller's view -------------------------------------------------------------------

    def _device_counts(self) -> tuple[int, int]:
        """(GPUs in use by the engine and the shards, expert shards on CPU). Shards sharing a
        GPU (shard_gpus < 1) count the GPUs they occupy, not one each."""
        shards = self.shards
        if self.pool is None or not self.pool.device.startswith("cuda"):
            return (1 if self.on_gpu else 0), shards
        shard_gpus = math.ceil(shards * self.pool.shard_request[1] - 1e-9)
        return (1 if self.on_gpu else 0) + shard_gpus, 0

    def devices(self) -> int:
        """Devices in use, counted as the controller counts them."""
        return devices_in_use(*self._device_counts())

    def counters(self) -> Counters:
        shards = self.shards
        gpus, cpu_shards = self._device_counts()
        busy = self._reconfiguring()
        fractions, measured = self.window()
        return Counters(
            tokens_generated=self.engine.tokens_generated,
            tokens_processed=self.engine.tokens_processed,
            step_fractions=fractions,
            measured_efficiency=measured.efficiency if measured else None,
            gpus=gpus,
            cpu_shards=cpu_shards,
            queue_depth=self.engine.queue_depth,
            expert_load_cv=self.load[0] if shards else None,
            max_over_mean=self.load[1] if shards else None,
            p99_ttft_s=p99(self.ttft),
            p99_tpot_s=p99(self.tpot),
            can_scale_out=shards > 0 and not busy and self._room_for_shard(),
            can_scale_in=shards > 1 and not busy,
            can_rebalance=shards > 0 and not busy and self._rebalance_helps(),
            running=len(self.engine.running),
            engine_slots=self.engine.slot_limit,
            draining=self.engine.draining,
        )

    def _rebalance_helps(self) -> bool:
        """A placement from the load window would cut the worst layer's predicted CV by at least
        REBALANCE_MIN_GAIN of it: below that a rebalance costs a load and a switch for nothing,
        and, proposed every period, would shut out every other action (RELIABILITY.md)."""
        balancer = self.pool.balancer
        current = [balancer.placement(layer) for layer in range(balancer.num_layers)]
        now, new = placement_gain(current, balancer.tokens_per_expert(), self.pool.redundant)
        return new < now * (1.0 - REBALANCE_MIN_GAIN)

    def _reconfiguring(self) -> bool:
        return self._reconfig is not None and self._reconfig.is_alive()

    def _room_for_shard(self) -> bool:
        """The cluster has what one more ExpertShard asks for (experts/shard_resources.py), or
        an autoscaler will add a node for it (the shard's reservation is the demand it sees)
        unless the last scale-out found none and the cluster has not grown since."""
        import ray

        kind, amount = self.pool.shard_request
        if ray.available_resources().get(kind, 0.0) >= amount:
            return True
        if not self.cluster_autoscaling:
            return False
        total = ray.cluster_resources().get(kind, 0.0)
        if self._scale_out_from is not None:
            since, total_then = self._scale_out_from
            timed_out = "reconfiguration failed: PlacementTimeout"
            if any(e.startswith(timed_out) for e in self.pool.events[since:]):
                # The autoscaler is at its limit: asking again would only wait out the timeout.
                self._autoscaler_full_at, self._scale_out_from = total_then, None
        return total != self._autoscaler_full_at

    def _cluster_total(self) -> float:
        import ray

        return ray.cluster_resources().get(self.pool.shard_request[0], 0.0)

    # -- carrying out decisions ------------------------------------------------------------------

    def apply(self, decision: Decision) -> dict:
        """Carry out one decision; returns what changed. Raises when it cannot be done (the
        controller then keeps its state and proposes again)."""
        log.info("controller action %s: %s", decision.action, decision.reason)
        action = decision.action
        if action in ("scale_out", "scale_in", "rebalance"):
            if self._reconfiguring():
                raise RuntimeError("a shard reconfiguration is still loading")
            pool = self.pool
            if pool is None:
                raise RuntimeError(f"{action} needs expert shards (expert_shards > 0)")
            method = {"scale_out": pool.add_shard, "scale_in": pool.remove_shard,
                      "rebalance": pool.rebalance}[action]  # fmt: skip
            if action == "scale_out" and self.cluster_autoscaling:  # did the autoscaler find room?
                self._scale_out_from = (len(pool.events), self._cluster_total())
            self._reconfig = method()  # loads in the background, switches later
            return {"action": action, "shards": self.shards}
        if action in ("batch_fallback", "revert_fallback") and decision.batch is not None:
            b = decision.batch
            now = self.engine.set_batch(b.step_token_budget, b.max_batch_slots, b.batch_wait_ms)
            return {"action": action, "level": b.level} | now
        return {"action": action}
