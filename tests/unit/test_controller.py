"""The controller: decide() as a table, hysteresis and cooldown, the loop that never dies, the live
rate, and targets from the planner."""

from __future__ import annotations

import threading

import pytest
from pydantic import ValidationError

from serving.control.controller import (
    ControllerConfig,
    ControllerState,
    Observation,
    PhaseTarget,
    batch_settings,
    config_from_plan,
    decide,
    devices_in_use,
    plan_for,
    tokens_per_ms_per_device,
)
from serving.control.controller_loop import ControllerLoop, Counters, TokenWindow

TARGET = 10.0
PHASES = (
    PhaseTarget(name="phase 1", tokens_per_ms=TARGET),
    PhaseTarget(name="phase 2", tokens_per_ms=20.0),
    PhaseTarget(name="phase 3", tokens_per_ms=99.0, feasible=False),
)
# No hysteresis: decide() acts on the first period, so a table row tests the rules alone.
IMMEDIATE = dict(confirm_periods=1, scale_in_periods=1, revert_periods=1, cooldown_periods=0)


def config(**fields) -> ControllerConfig:
    base = dict(phases=PHASES, ceiling_tokens_per_ms=30.0, max_batch=64, **IMMEDIATE)
    return ControllerConfig(**(base | fields))


def obs(live: float | None = TARGET, **fields) -> Observation:
    return Observation(tokens_per_ms_per_device=live, **({"devices": 1} | fields))


DEEP, SHALLOW = 20, 0
ENGINE_HEAVY = {"dense": 0.5, "expert": 0.2, "transport": 0.2, "imbalance": 0.05, "bubble": 0.05}
# A deep queue with shards, where another engine and another shard both fit.
BOTH_CAN_GROW = dict(queue_depth=DEEP, can_add_engine=True, can_scale_out=True, expert_load_cv=0.1)
EXPERT_HEAVY = {"dense": 0.2, "expert": 0.4, "transport": 0.3, "imbalance": 0.05, "bubble": 0.05}
TABLE = [
    # (name, observation, config fields, state fields, expected action)
    ("no measurement yet", obs(None), {}, {}, "hold"),
    ("on target", obs(TARGET), {}, {}, "hold"),
    ("within the margin", obs(TARGET * 0.95), {}, {}, "hold"),
    ("no phases at all", obs(1.0), {"phases": ()}, {}, "hold"),
    (
        "shortfall, deep queue, room",
        obs(5.0, queue_depth=DEEP, can_scale_out=True),
        {},
        {},
        "scale_out",
    ),
    ("shortfall, deep queue, no room", obs(5.0, queue_depth=DEEP), {}, {}, "batch_fallback"),
    (
        "shortfall, deep queue, no room, fixed batches",
        obs(5.0, queue_depth=DEEP),
        {"batch_strategy": "fixed"},
        {},
        "hold",
    ),
    ("shortfall, shallow queue", obs(5.0, queue_depth=SHALLOW), {}, {}, "batch_fallback"),
    (
        "shortfall, shallow queue, throughput strategy",
        obs(5.0),
        {"batch_strategy": "throughput"},
        {},
        "batch_fallback",
    ),
    ("shortfall, latency strategy", obs(5.0), {"batch_strategy": "latency"}, {}, "hold"),
    ("fallback exhausted", obs(5.0), {}, {"fallback_level": 3}, "hold"),
    (
        "fallback capped after a revert",
        obs(5.0),
        {},
        {"fallback_level": 1, "fallback_cap": 1},
        "hold",
    ),
    (
        "surplus devices: the work fits one fewer",
        obs(2.0, devices=4, can_scale_in=True),
        {},
        {},
        "scale_in",
    ),
    (
        "shortfall, but one fewer device would exceed the target",
        obs(8.0, devices=4, can_scale_in=True),
        {},
        {},
        "batch_fallback",
    ),
    ("surplus, but not allowed to scale in", obs(2.0, devices=4), {}, {}, "batch_fallback"),
    (
        "surplus at the shallow mark (half the deep one)",
        obs(2.0, devices=4, can_scale_in=True, queue_depth=4),
        {"deep_queue": 8},
        {},
        "scale_in",
    ),
    (
        "surplus, but the queue is between the marks: the devices stay",
        obs(2.0, devices=4, can_scale_in=True, queue_depth=5),
        {"deep_queue": 8},
        {},
        "batch_fallback",
    ),
    (
        "an explicit shallow mark",
        obs(2.0, devices=4, can_scale_in=True, queue_depth=5),
        {"deep_queue": 8, "shallow_queue": 6},
        {},
        "scale_in",
    ),
    (
        "surplus, but at the minimum",
        obs(2.0, devices=2, can_scale_in=True),
        {"min_devices": 2},
        {},
        "batch_fallback",
    ),
    (
        "load CV above target",
        obs(TARGET, expert_load_cv=0.3, max_over_mean=1.6),
        {},
        {},
        "rebalance",
    ),
    ("load CV below target", obs(TARGET, expert_load_cv=0.1), {}, {}, "hold"),
    (
        "load CV above target, rebalance in flight",
        obs(TARGET, expert_load_cv=0.3, can_rebalance=False),
        {},
        {},
        "hold",
    ),
    (
        "TPOT bound broken under a fallback",
        obs(5.0, p99_tpot_s=0.5),
        {},
        {"fallback_level": 2},
        "revert_fallback",
    ),
    (
        "TTFT bound broken under a fallback",
        obs(TARGET, p99_ttft_s=9.0),
        {},
        {"fallback_level": 1},
        "revert_fallback",
    ),
    ("latency broken, no fallback to undo", obs(5.0, p99_tpot_s=0.5), {}, {}, "hold"),
    (
        "latency broken, throughput strategy ignores it",
        obs(5.0, p99_tpot_s=0.5),
        {"batch_strategy": "throughput"},
        {"fallback_level": 1},
        "batch_fallback",
    ),
    (
        "latency bound off",
        obs(5.0, p99_tpot_s=0.5),
        {"max_p99_tpot_s": None},
        {},
        "batch_fallback",
    ),
    ("current phase 2: 12 is a shortfall", obs(12.0), {"phase": "phase 2"}, {}, "batch_fallback"),
    # Engine replicas: more of what limits the step.
    (
        "deep queue, experts in the engines: another engine",
        obs(5.0, queue_depth=DEEP, can_add_engine=True),
        {},
        {},
        "add_engine",
    ),
    (
        "deep queue, the dense side takes most of the step: an engine before a shard",
        obs(5.0, **BOTH_CAN_GROW, step_fractions=ENGINE_HEAVY),
        {},
        {},
        "add_engine",
    ),
    (
        "deep queue, the experts take most of the step: a shard before an engine",
        obs(5.0, **BOTH_CAN_GROW, step_fractions=EXPERT_HEAVY),
        {},
        {},
        "scale_out",
    ),
    (
        "deep queue, the experts limit but no room for a shard: an engine",
        obs(
            5.0,
            queue_depth=DEEP,
            can_add_engine=True,
            expert_load_cv=0.1,
            step_fractions=EXPERT_HEAVY,
        ),
        {},
        {},
        "add_engine",
    ),
    (
        "shallow queue, the running requests fit half of one engine fewer",
        obs(
            5.0, queue_depth=SHALLOW, engines=3, running=16, engine_slots=16, can_remove_engine=True
        ),
        {},
        {},
        "remove_engine",
    ),
    (
        "shallow queue, too many running for one engine fewer",
        obs(
            5.0, queue_depth=SHALLOW, engines=2, running=9, engine_slots=16, can_remove_engine=True
        ),
        {},
        {},
        "batch_fallback",
    ),
    (
        "shallow queue, at the configured engines",
        obs(5.0, queue_depth=SHALLOW, engines=2, running=0, engine_slots=16),
        {},
        {},
        "batch_fallback",
    ),
]


@pytest.mark.parametrize(
    ("observation", "fields", "state", "expected"),
    [row[1:] for row in TABLE],
    ids=[row[0] for row in TABLE],
)
def test_decide_table(observation, fields, state, expected):
    decision, _ = decide(ControllerState(**state), observation, config(**fields))
    assert decision.action == expected, decision.reason
    assert decision.reason


def run_periods(cfg: ControllerConfig, observations: list[Observation]) -> list[str]:
    state, actions = ControllerState(), []
    for o in observations:
        decision, state = decide(state, o, cfg)
        actions.append(decision.action)
    return actions


def test_hysteresis_needs_consecutive_periods_then_cools_down():
    cfg = config(confirm_periods=3, cooldown_periods=2)
    short = obs(5.0, queue_depth=DEEP, can_scale_out=True)
    assert run_periods(cfg, [short] * 7) == [
        "hold", "hold", "scale_out",  # confirmed on the third period
        "hold", "hold",  # cooldown
        "scale_out",  # the condition held through the cooldown: three periods again
        "hold",
    ]  # fmt: skip


def test_hysteresis_interrupted_streak_restarts():
    cfg = config(confirm_periods=3)
    short, fine = obs(5.0, queue_depth=DEEP, can_scale_out=True), obs(TARGET)
    assert "scale_out" not in run_periods(cfg, [short, short, fine, short, short])


def test_removing_an_engine_needs_the_longer_sustained_surplus():
    cfg = config(confirm_periods=1, scale_in_periods=3, cooldown_periods=0)
    idle = obs(5.0, queue_depth=SHALLOW, engines=2, running=0, engine_slots=16,
               can_remove_engine=True)  # fmt: skip
    assert run_periods(cfg, [idle] * 3) == ["hold", "hold", "remove_engine"]


def test_scale_in_needs_longer_sustained_surplus():
    cfg = config(confirm_periods=1, scale_in_periods=4)
    surplus = obs(1.0, devices=4, can_scale_in=True)
    assert run_periods(cfg, [surplus] * 4) == ["hold", "hold", "hold", "scale_in"]


def test_pending_hold_says_why():
    decision, _ = decide(ControllerState(), obs(5.0, queue_depth=DEEP), config(confirm_periods=2))
    assert decision.action == "hold"
    assert "batch_fallback pending (1/2" in decision.reason


def test_fallback_levels_and_revert_ignores_cooldown():
    cfg = config(cooldown_periods=5)
    state = ControllerState()
    decision, state = decide(state, obs(5.0), cfg)
    assert decision.action == "batch_fallback" and state.fallback_level == 1
    assert decision.batch == batch_settings(cfg, 1)
    # In cooldown a further fallback waits, but a latency break reverts at once.
    decision, state = decide(state, obs(5.0), cfg)
    assert decision.action == "hold" and "cooldown" in decision.reason
    decision, state = decide(state, obs(5.0, p99_tpot_s=1.0), cfg)
    assert decision.action == "revert_fallback" and state.fallback_level == 0
    assert decision.batch == batch_settings(cfg, 0)
    assert state.fallback_cap == 0  # level 1 broke latency: never again


def test_batch_settings_respect_the_memory_limit():
    cfg = config(max_batch=24, seq_len=128)
    assert batch_settings(cfg, 0).max_batch_slots == 16
    assert batch_settings(cfg, 1).max_batch_slots == 24  # 32 would not fit
    assert batch_settings(cfg, 1).step_token_budget == 1024
    assert batch_settings(cfg, 3).step_token_budget == 24 * 128  # not 4096
    assert batch_settings(cfg, 2).batch_wait_ms == pytest.approx(10.0)


def test_no_fallback_room_when_the_plan_allows_no_bigger_batch():
    cfg = config(max_batch=16)  # base slots 16 already at the limit; budget still grows
    assert run_periods(cfg, [obs(5.0)])[0] == "batch_fallback"
    cfg = config(max_batch=1, seq_len=512)  # one sequence of 512 tokens: the base budget
    assert run_periods(cfg, [obs(5.0)])[0] == "hold"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"phase": "phase 9"}, "not a planner phase"),
        ({"phase": "phase 3"}, "exceeds the ceiling"),
        ({"shortfall_margin": 1.5}, "shortfall_margin"),
    ],
)
def test_config_rejects(fields, message):
    with pytest.raises(ValidationError, match=message):
        config(**fields)


def test_config_is_frozen_and_picks_first_feasible_phase():
    cfg = config()
    with pytest.raises(ValidationError):
        cfg.period_s = 1.0
    assert cfg.current_phase() == (1, PHASES[0])
    assert config(phase="phase 2").current_phase() == (2, PHASES[1])


# --- the live rate ---


def test_tokens_per_ms_per_device():
    samples = [(100.0, 0), (101.0, 500), (102.0, 4000)]
    assert tokens_per_ms_per_device(samples, devices=2) == pytest.approx(4000 / 2000 / 2)
    assert tokens_per_ms_per_device(samples[:1], devices=1) is None
    assert tokens_per_ms_per_device([(1.0, 5), (1.0, 9)], devices=1) is None  # no time passed
    assert tokens_per_ms_per_device([(1.0, 9), (2.0, 5)], devices=1) is None  # counter reset
    assert devices_in_use(gpus=0, cpu_shards=0) == 1
    assert devices_in_use(gpus=0, cpu_shards=3) == 3
    assert devices_in_use(gpus=8, cpu_shards=0) == 8


def test_token_window_slides_and_survives_a_reset():
    window = TokenWindow(window_s=10.0)
    for t in range(0, 31, 5):  # 100 tokens per second
        window.add(float(t), 100 * t)
    assert window.rate(devices=1) == pytest.approx(0.1)
    assert [t for t, _ in window._samples] == [20.0, 25.0, 30.0]  # covers exactly 10 s
    window.add(31.0, 3)  # the app restarted
    assert window.rate(devices=1) is None
    window.add(32.0, 203)
    assert window.rate(devices=2) == pytest.approx(200 / 1000 / 2)


# --- the loop ---


class FakeMetrics:
    def __init__(self):
        self.actions: list[str] = []
        self.refreshed = 0

    def count_action(self, action):
        self.actions.append(action)

    def record_throughput(self, value):
        pass

    def record_load(self, **_):
        pass

    def set_targets(self, **_):
        pass

    def refresh(self):
        self.refreshed += 1


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        self.t += 1.0
        return self.t


def test_loop_never_dies_when_observe_or_apply_raise():
    reads = iter([RuntimeError("app not up"), 0, 100, 200, 300])
    applied, fail_apply = [], [True]

    def read() -> Counters:
        value = next(reads)
        if isinstance(value, Exception):
            raise value
        return Counters(tokens_generated=value, queue_depth=DEEP, can_scale_out=True)

    def apply(decision):
        if fail_apply.pop() if fail_apply else False:
            raise RuntimeError("cluster refused")
        applied.append(decision.action)

    metrics = FakeMetrics()
    cfg = config(phases=(PhaseTarget(name="phase 1", tokens_per_ms=1.0),))
    loop = ControllerLoop(cfg, read, apply, metrics=metrics, clock=Clock())
    assert loop.step() is None  # observe raised: logged, counted
    assert loop.step().action == "hold"  # one sample: no rate yet
    assert loop.step() is None  # 0.1 tokens/ms < 1: scale_out, but apply raised
    assert loop.state.cooldown == 0  # the failed action left the state as it was
    assert loop.step().action == "scale_out"  # proposed again, applied
    assert loop.failures == 2
    assert applied == ["scale_out"]
    assert metrics.actions == ["hold", "scale_out"] and metrics.refreshed == 2
    report = loop.status()
    assert report.actions[-1].action == "scale_out" and report.phase == "phase 1"
    assert report.tokens_per_ms_per_device == pytest.approx(0.1)


def test_loop_run_keeps_going_through_failures():
    calls = []

    def read():
        calls.append(1)
        if len(calls) >= 4:
            stop.set()
        raise ValueError("always broken")

    stop = threading.Event()
    loop = ControllerLoop(config(period_s=0.01), read, lambda d: None)
    thread = threading.Thread(target=loop.run, args=(stop,))
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert loop.failures >= 4


# --- targets from the planner ---


def test_targets_for_the_demo_model_on_this_cpu():
    plan = plan_for("tiny", "cpu", cpu_seconds=0.2)
    cfg = config_from_plan(plan, seq_len=512, **IMMEDIATE)
    number, phase = cfg.current_phase()
    assert (number, phase.name) == (1, "phase 1")
    assert 0 < phase.tokens_per_ms < cfg.ceiling_tokens_per_ms == plan.ceiling_tokens_per_ms
    assert [p.name for p in cfg.phases] == [p.name for p in plan.phases]
    row = next(m for m in plan.memory if m.seq_len == 512)
    assert cfg.max_batch == max(row.max_batch, 1)


def test_targets_for_the_seed_model_on_the_seed_gpu():
    plan = plan_for("seed-4b", "seed-240tflops")
    cfg = config_from_plan(plan, seq_len=3000)
    # ceiling = 240e12 / (2 x 4e9) / 1000 = 30 tokens/ms per GPU; phase 1 = 30 x efficiency.
    assert cfg.ceiling_tokens_per_ms == pytest.approx(30.0)
    assert cfg.current_phase()[1].tokens_per_ms == pytest.approx(30.0 * plan.efficiency)
    assert cfg.max_batch == next(m.max_batch for m in plan.memory if m.seq_len == 4096)


def test_targets_fill_a_configured_base():
    plan = plan_for("seed-4b", "seed-240tflops")
    base = ControllerConfig(batch_strategy="latency", deep_queue=32, phases=PHASES)
    cfg = config_from_plan(plan, base=base, phase="phase 2")
    assert (cfg.batch_strategy, cfg.deep_queue) == ("latency", 32)
    assert cfg.phases[0].tokens_per_ms == pytest.approx(plan.phases[0].tokens_per_ms)
    assert cfg.current_phase()[1].name == "phase 2"


def test_a_shallow_mark_at_or_above_the_deep_one_is_refused():
    with pytest.raises(ValueError, match="shallow_queue"):
        config(deep_queue=4, shallow_queue=4)
