"""The controller's decisions: live tokens/ms per device against the planner's phased targets.

`decide(state, observation, config) -> (Decision, new state)` is pure: no clock, no I/O, no Ray.
serving/control/controller_loop.py runs it every period (reading counters, applying, logging, counting).

Each period one action is proposed; the first rule that holds wins:
  1. no live measurement or no phase target             -> hold
  2. latency broken (p99 TTFT or TPOT over its bound)
     while a batch fallback is in force (adaptive)       -> revert_fallback (one level)
  3. expert load CV across shards above target (0.15)    -> rebalance
  4. shortfall (live < target x (1 - margin)), deep queue
     -> more of what limits: add_engine when the engines do (their own work, attention and the
        dense layers, takes most of the step, or the experts run inside them) and one more may
        start, scale_out (a shard) when the experts do and resources allow; else the other of
        the two; else batch_fallback where it has room, else hold
  5. shortfall, shallow queue (at most `shallow_queue`: half the deep mark by default; the band
     between holds the devices, so a queue hovering at the deep mark does not flap)
     -> remove_engine when the running requests fit half the batch slots of one engine fewer,
        else scale_in when the work fits one device fewer, each still below target (surplus
        devices), else batch_fallback where it has room, else hold
  6. otherwise                                           -> hold
Hysteresis: an action is taken only after it was proposed `confirm_periods` periods in a row
(`scale_in_periods` for scale_in, `revert_periods` for revert_fallback), and after any action
`cooldown_periods` periods hold while its effect shows; only revert_fallback (latency is a hard
bound) ignores the cooldown. After a revert, fallback never again climbs to the level that broke
latency (no oscillation).

Batch strategies: `fixed` never changes batch settings; `throughput` falls back on shortfall and
ignores latency bounds; `latency` never falls back; `adaptive` falls back and reverts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from serving.config import BatchStrategy, ControllerConfig, FallbackConfig, PhaseTarget
from serving.control.capacity import Plan, PlanOptions

__all__ = ["BatchStrategy", "ControllerConfig", "FallbackConfig", "PhaseTarget", "decide"]

Action = Literal[
    "hold", "scale_out", "scale_in", "batch_fallback", "revert_fallback", "rebalance",
    "add_engine", "remove_engine",
]  # fmt: skip
ACTIONS: tuple[str, ...] = Action.__args__


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Observation(Frozen):
    """What the controller sees each period (serving/control/controller_loop.py builds it)."""

    tokens_per_ms_per_device: float | None  # live, sliding window; None before two samples
    devices: int = Field(ge=1)
    queue_depth: int = Field(0, ge=0)
    expert_load_cv: float | None = None  # worst layer, across shards; None without shards
    max_over_mean: float | None = None
    p99_ttft_s: float | None = None
    p99_tpot_s: float | None = None
    can_scale_out: bool = False  # the cluster has room for one more shard or replica
    can_scale_in: bool = False  # the deployment may lose one (above its configured minimum)
    can_rebalance: bool = True  # False while a rebalance is in flight, or without shards
    # The engine's step-time breakdown (serving/control/steptime.py PARTS -> share of step time) and the
    # measured efficiency; None before any step.
    step_fractions: dict[str, float] | None = None
    measured_efficiency: float | None = None
    # Engine replicas (attention, KV cache, scheduler; config.max_engine_replicas): how many
    # serve, the requests in their batches and the batch slots of one.
    engines: int = Field(1, ge=1)
    running: int = Field(0, ge=0)
    engine_slots: int = Field(0, ge=0)
    can_add_engine: bool = False  # a standby engine exists and the cluster has room for it
    can_remove_engine: bool = False  # more engines serve than the configured engine_replicas


class BatchSettings(Frozen):
    """What the scheduler should use at a fallback level."""

    level: int
    step_token_budget: int
    max_batch_slots: int
    batch_wait_ms: float


class Decision(Frozen):
    action: Action
    reason: str
    batch: BatchSettings | None = None  # for batch_fallback and revert_fallback


@dataclass(frozen=True)
class ControllerState:
    """What decide() carries from one period to the next."""

    proposed: str = "hold"  # the action proposed last period
    streak: int = 0  # periods in a row it was proposed
    cooldown: int = 0  # periods left to hold after an action
    fallback_level: int = 0
    fallback_cap: int | None = None  # highest level allowed after a revert
    periods: int = 0


def tokens_per_ms_per_device(samples: Sequence[tuple[float, int]], devices: int) -> float | None:
    """Live rate over a window of counter samples.

    samples: (time in s, cumulative tokens generated) pairs, oldest first, all within the window.
    Returns tokens / elapsed ms / devices; None with fewer than two samples, no elapsed time, no
    device, or a counter that went back (a restart: the window must refill).
    """
    if len(samples) < 2 or devices < 1:
        return None
    (t0, n0), (t1, n1) = samples[0], samples[-1]
    if t1 <= t0 or n1 < n0:
        return None
    return (n1 - n0) / ((t1 - t0) * 1000.0) / devices


def devices_in_use(gpus: int, cpu_shards: int) -> int:
    """Devices the rate is divided by: GPUs in use, CPU-only expert shards each count as one, and
    a deployment with neither (everything in one CPU process) is one device."""
    return max(1, gpus + cpu_shards)


def batch_settings(config: ControllerConfig, level: int) -> BatchSettings:
    """The scheduler settings at a fallback level, within the planner's memory limit."""
    f = config.fallback
    grow = f.factor**level
    slots = int(f.base_max_batch_slots * grow)
    budget = int(f.base_step_token_budget * grow)
    if config.max_batch is not None:
        # KV cache slots beyond what fits in memory would fail at allocation; a step never needs
        # more tokens than every fitting sequence at full length.
        slots = max(min(slots, config.max_batch), min(f.base_max_batch_slots, config.max_batch))
        budget = min(budget, max(config.max_batch * config.seq_len, f.base_step_token_budget))
    wait = f.base_batch_wait_ms + level * f.batch_wait_ms_per_level
    return BatchSettings(
        level=level, step_token_budget=budget, max_batch_slots=slots, batch_wait_ms=wait
    )


def _fallback_room(config: ControllerConfig, state: ControllerState) -> bool:
    cap = config.fallback.max_level
    if state.fallback_cap is not None:
        cap = min(cap, state.fallback_cap)
    if state.fallback_level >= cap:
        return False
    now = batch_settings(config, state.fallback_level)
    after = batch_settings(config, state.fallback_level + 1)
    # Only a wider step counts as room: a longer wait alone at the memory limit buys nothing.
    return after.step_token_budget > now.step_token_budget or (
        after.max_batch_slots > now.max_batch_slots
    )


def _latency_broken(config: ControllerConfig, obs: Observation) -> str | None:
    for label, seen, bound in (
        ("TTFT", obs.p99_ttft_s, config.max_p99_ttft_s),
        ("TPOT", obs.p99_tpot_s, config.max_p99_tpot_s),
    ):
        if seen is not None and bound is not None and seen > bound:
            return f"p99 {label} {seen * 1000:.0f} ms > bound {bound * 1000:.0f} ms"
    return None


LOSS_PARTS = {"transport": "transport", "imbalance": "waiting on the slowest shard",
              "bubble": "bubbles between steps"}  # fmt: skip


def _largest_loss(obs: Observation, target_cv: float) -> str:
    """'; largest loss: ...' naming the step-time part that costs most, when measured."""
    fractions = obs.step_fractions or {}
    losses = {p: fractions[p] for p in LOSS_PARTS if p in fractions}
    if not losses:
        return ""
    part = max(losses, key=losses.get)
    note = f"; largest loss: {LOSS_PARTS[part]} {losses[part]:.0%} of step time"
    cv = obs.expert_load_cv
    if part == "imbalance" and cv is not None and cv <= target_cv:
        note += f" with even load (CV {cv:.2f}): a slow shard, not hot experts"
    return note


def propose(
    state: ControllerState, obs: Observation, config: ControllerConfig
) -> tuple[Action, str]:
    """This period's action and its reason, before hysteresis (rules 1-6 of the module doc)."""
    # 1. Nothing to compare.
    current = config.current_phase()
    if current is None:
        return "hold", "no feasible phase target (derive targets with the planner)"
    live, target = obs.tokens_per_ms_per_device, current[1].tokens_per_ms
    if live is None:
        return "hold", "no live measurement yet (window filling)"
    rate = f"{live:.3g} tokens/ms/device vs {current[1].name} target {target:.3g}"
    rate += _largest_loss(obs, config.target_cv)
    # 2. Latency bounds break: undo the fallback first (the adaptive strategy only).
    broken = _latency_broken(config, obs)
    if broken and config.batch_strategy == "adaptive" and state.fallback_level > 0:
        return "revert_fallback", f"{broken} at fallback level {state.fallback_level}"
    # 3. Imbalance makes stragglers: cheaper to fix than adding devices.
    cv = obs.expert_load_cv
    if cv is not None and cv > config.target_cv and obs.can_rebalance:
        mm = f", max/mean {obs.max_over_mean:.2f}" if obs.max_over_mean is not None else ""
        return "rebalance", f"load CV {cv:.3f} > {config.target_cv}{mm}"
    if live >= target * (1.0 - config.shortfall_margin):
        return "hold", f"on target: {rate}"
    # 4-5. Shortfall: more devices when work waits, else bigger batches, else fewer devices.
    strategy = config.batch_strategy
    # Adaptive does not fall back while latency is broken: a bigger batch would break it further.
    allowed = strategy == "throughput" or (strategy == "adaptive" and not broken)
    can_fallback = allowed and _fallback_room(config, state)
    queue = f"queue {obs.queue_depth}"
    if obs.queue_depth >= config.deep_queue:
        grow = _more_of_what_limits(obs)
        if grow is not None:
            return grow[0], f"shortfall, deep {queue}, {grow[1]}: {rate}"
        if can_fallback:
            return "batch_fallback", f"shortfall, deep {queue}, no room to scale out: {rate}"
        return "hold", f"shortfall, deep {queue}, no room to scale out nor fall back: {rate}"
    if obs.queue_depth <= config.shallow_mark and _surplus_engine(obs):
        fits = f"{obs.running} running fit half of {obs.engines - 1} engine(s)' slots"
        return "remove_engine", f"surplus engine, shallow {queue}, {fits}: {rate}"
    fewer = obs.devices - 1
    surplus = fewer >= config.min_devices and obs.can_scale_in
    surplus = surplus and obs.queue_depth <= config.shallow_mark
    if surplus and live * obs.devices / fewer <= target * (1.0 - config.surplus_margin):
        return "scale_in", f"surplus: the work fits {fewer} device(s) below target: {rate}"
    if can_fallback:
        return "batch_fallback", f"shortfall, shallow {queue}: {rate}"
    return "hold", f"shortfall, shallow {queue}, no fallback left ({config.batch_strategy}): {rate}"


ENGINE_PARTS = ("dense", "bubble")  # step-time parts that are the engine's own work


def engine_bound(obs: Observation) -> bool:
    """The engines limit the step: the experts run inside them (no shards), or their own work
    (dense layers and attention, the bubbles between steps) is at least half of it. Else the
    experts do: their compute, imbalance and transport take the larger part."""
    if obs.expert_load_cv is None:
        return True  # no shards: an engine carries its experts
    fractions = obs.step_fractions or {}
    return bool(fractions) and sum(fractions.get(p, 0.0) for p in ENGINE_PARTS) >= 0.5


def _more_of_what_limits(obs: Observation) -> tuple[Action, str] | None:
    """add_engine or scale_out for a deep queue, the limiting side's first; None: neither can."""
    engines = (obs.can_add_engine, "add_engine", "the engines limit", "no engine to add")
    experts = (obs.can_scale_out, "scale_out", "the experts limit", "no room for a shard")
    first, second = (engines, experts) if engine_bound(obs) else (experts, engines)
    if first[0]:
        return first[1], first[2]
    if second[0]:
        return second[1], f"{first[2]}, {first[3]}"
    return None


def _surplus_engine(obs: Observation) -> bool:
    """One engine fewer would still run every running request in half its batch slots (the
    other half is the headroom that keeps a new burst from adding it straight back)."""
    if not obs.can_remove_engine or obs.engines < 2 or obs.engine_slots < 1:
        return False
    return 2 * obs.running <= (obs.engines - 1) * obs.engine_slots


def _periods_needed(config: ControllerConfig, action: str) -> int:
    slow = {"scale_in": config.scale_in_periods, "remove_engine": config.scale_in_periods}
    return (slow | {"revert_fallback": config.revert_periods}).get(action, config.confirm_periods)


def decide(
    state: ControllerState, obs: Observation, config: ControllerConfig
) -> tuple[Decision, ControllerState]:
    """One period: propose, then apply hysteresis and cooldown. Pure."""
    action, reason = propose(state, obs, config)
    streak = state.streak + 1 if action == state.proposed else 1
    cooldown = max(0, state.cooldown - 1)
    waiting = replace(
        state, proposed=action, streak=streak, cooldown=cooldown, periods=state.periods + 1
    )
    if action == "hold":
        return Decision(action="hold", reason=reason), waiting
    if state.cooldown > 0 and action != "revert_fallback":
        why = f"cooldown ({state.cooldown} period(s) left); would {action}: {reason}"
        return Decision(action="hold", reason=why), waiting
    need = _periods_needed(config, action)
    if streak < need:
        why = f"{action} pending ({streak}/{need} periods): {reason}"
        return Decision(action="hold", reason=why), waiting
    # Act: the streak restarts and the cooldown begins.
    acted = replace(waiting, proposed="hold", streak=0, cooldown=config.cooldown_periods)
    batch = None
    if action == "batch_fallback":
        acted = replace(acted, fallback_level=state.fallback_level + 1)
    elif action == "revert_fallback":
        level = state.fallback_level - 1
        acted = replace(acted, fallback_level=level, fallback_cap=level)
    if action in ("batch_fallback", "revert_fallback"):
        batch = batch_settings(config, acted.fallback_level)
    return Decision(action=action, reason=reason, batch=batch), acted


# --- targets from the planner ---


def phase_targets(plan: Plan) -> tuple[PhaseTarget, ...]:
    """The plan's phases as controller targets (infeasible ones kept, marked, never chosen)."""
    return tuple(
        PhaseTarget(name=p.name, tokens_per_ms=p.tokens_per_ms, feasible=p.feasible)
        for p in plan.phases
    )


def config_from_plan(
    plan: Plan, seq_len: int = 2048, base: ControllerConfig | None = None, **fields
) -> ControllerConfig:
    """`base` (its thresholds, e.g. from configs/serve.yaml) with targets, ceiling and memory limit
    from `plan`; `fields` override any field.

    max_batch is the plan's memory row for the smallest planned length >= seq_len (the longest
    planned one if none is that long).
    """
    rows = sorted(plan.memory, key=lambda m: m.seq_len)
    row = next((m for m in rows if m.seq_len >= seq_len), rows[-1] if rows else None)
    planned = {
        "phases": phase_targets(plan),
        "ceiling_tokens_per_ms": plan.ceiling_tokens_per_ms,
        "max_batch": max(row.max_batch, 1) if row is not None else None,
        "seq_len": seq_len,
    }
    data = (base.model_dump() if base is not None else {}) | planned | fields
    return ControllerConfig.model_validate(data)


def plan_for(
    model: str, hardware: str, options: PlanOptions | None = None, cpu_seconds: float = 2.0
) -> Plan:
    """plan() for a model and hardware profile given as `moe-serve plan` takes them (a name, a
    YAML or a checkpoint's config.json; `cpu` is measured for `cpu_seconds`)."""
    from serving.control import capacity
    from serving.control.specs import load_hardware_spec, load_model_spec

    spec = load_model_spec(model)
    hw = load_hardware_spec(hardware, seconds=cpu_seconds)
    return capacity.plan(spec, hw, options or PlanOptions())
