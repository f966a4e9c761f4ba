"""The deployed app's controller config: planner targets for the model and hardware profile."""

from __future__ import annotations

import pytest

from serving.config import SchedulerConfig, ServeConfig
from serving.control.controller import ControllerConfig, PhaseTarget
from serving.control.controller_app import controller_config, deployment_plan


def test_targets_come_from_the_planner_with_the_scheduler_as_fallback_base(demo_path):
    config = ServeConfig(
        hardware="h200",
        scheduler=SchedulerConfig(max_batch_slots=8, step_token_budget=128, max_seq_len=512),
        controller=ControllerConfig(period_s=2.0, batch_strategy="throughput"),
    )
    c = controller_config(config, deployment_plan(config, str(demo_path)))
    assert c.phases and c.phases[0].name == "phase 1" and c.ceiling_tokens_per_ms > 0
    assert c.seq_len == 512 and c.max_batch >= 1
    assert (c.period_s, c.batch_strategy) == (2.0, "throughput")  # thresholds kept
    assert (c.fallback.base_step_token_budget, c.fallback.base_max_batch_slots) == (128, 8)


def test_explicit_phases_skip_planning_and_a_bad_profile_only_holds(demo_path):
    given = ControllerConfig(phases=(PhaseTarget(name="mine", tokens_per_ms=3.0),))
    config = ServeConfig(hardware="no-such-gpu", controller=given)
    assert deployment_plan(config, str(demo_path)) is None  # logged, serving goes on
    c = controller_config(config, None)
    assert [p.name for p in c.phases] == ["mine"]
    c = controller_config(ServeConfig(hardware="no-such-gpu"), None)
    assert c.phases == () and c.current_phase() is None  # logged; decide() holds


def test_a_calibrated_deployment_gets_reachable_targets(demo_path, tmp_path):
    import json

    from serving.control.efficiency import EfficiencyBasis

    # A bench report of this (cpu) deployment: the plan's phase 1 becomes what it measured.
    from serving.control.specs import load_model_spec
    from tests.unit import test_calibrate

    # A fixed hardware profile, not `cpu` measured now: the targets must not move with how busy
    # this machine is while the test runs.
    hardware = tmp_path / "box.yaml"
    hardware.write_text(json.dumps(test_calibrate.HW.model_dump(exclude_none=True)))
    flops = 2.0 * load_model_spec(str(demo_path / "config.json")).params().active
    basis = EfficiencyBasis(
        hardware="box", peak_flops=1e11, peak_source="measured", flops_per_token=flops, devices=2
    )  # fmt: skip
    test_calibrate.BASIS, saved = basis, test_calibrate.BASIS
    try:
        path = test_calibrate.report(tmp_path / "bench.json", 8, 0)
    finally:
        test_calibrate.BASIS = saved
    measured = json.loads((tmp_path / "bench.json").read_text())["efficiency"]["measured"]
    config = ServeConfig(hardware=str(hardware), calibration=path)
    plan = deployment_plan(config, str(demo_path))
    assert set(plan.efficiency_factor_sources.values()) == {"measured"}
    c = controller_config(config, plan)
    assert c.phases[0].name == "phase 1"
    assert c.phases[0].tokens_per_ms == pytest.approx(
        measured["tokens_per_ms_per_device"], rel=0.01
    )
    # A report of another model is refused (logged: no plan, the controller holds).
    other = ServeConfig(hardware=str(hardware), calibration=str(tmp_path / "other.json"))
    data = json.loads((tmp_path / "bench.json").read_text())
    data["efficiency"]["basis"]["flops_per_token"] *= 3
    (tmp_path / "other.json").write_text(json.dumps(data))
    assert deployment_plan(other, str(demo_path)) is None
    # An uncalibrated plan assumes the seed's factors against the GEMM peak: far above what was
    # measured.
    uncalibrated = controller_config(
        config, deployment_plan(ServeConfig(hardware=str(hardware)), str(demo_path))
    )
    assert uncalibrated.phases[0].tokens_per_ms > 10 * c.phases[0].tokens_per_ms


def test_several_engines_counters_merge_into_the_apps():
    from serving.control.controller_app import merge_counters
    from serving.control.controller_loop import Counters

    a = Counters(tokens_generated=100, tokens_processed=400, queue_depth=3, gpus=3,
                 measured_efficiency=0.2, expert_load_cv=0.1, p99_ttft_s=0.5, can_scale_out=True,
                 step_fractions={"dense": 1.0})  # fmt: skip
    b = Counters(tokens_generated=50, tokens_processed=200, queue_depth=4, gpus=3,
                 measured_efficiency=0.1, expert_load_cv=0.3, p99_ttft_s=None, p99_tpot_s=0.02)  # fmt: skip
    assert merge_counters([a]) is a
    m = merge_counters([a, b])
    assert (m.tokens_generated, m.tokens_processed, m.queue_depth) == (150, 600, 7)
    assert m.measured_efficiency == pytest.approx(0.3)  # same devices: efficiencies add up
    assert (m.expert_load_cv, m.p99_ttft_s, m.p99_tpot_s) == (0.3, 0.5, 0.02)  # the worst
    assert m.gpus == 3 and m.can_scale_out and m.step_fractions == {"dense": 1.0}  # the first's
    on_gpus = merge_counters([a, b], engine_gpus=1)
    assert on_gpus.gpus == 4 and on_gpus.measured_efficiency is None
    assert (
        merge_counters([a, b.model_copy(update={"tokens_processed": None})]).tokens_processed
        is None
    )
