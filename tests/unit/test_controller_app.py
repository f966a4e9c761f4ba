"""The deployed app's controller config: planner targets for the model and hardware profile."""

from __future__ import annotations

from serving.config import SchedulerConfig, ServeConfig
from serving.controller import ControllerConfig, PhaseTarget
from serving.controller_app import controller_config, deployment_plan


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
