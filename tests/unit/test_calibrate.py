"""Calibration from bench reports: pooling, prediction at another batch, one-line errors."""

import json

import numpy as np
import pytest

from serving.control.calibrate import calibrated_options, load_calibration, prediction
from serving.control.capacity import HardwareSpec, PlanOptions
from serving.control.efficiency import EfficiencyBasis, fit, measure
from serving.control.steptime import PARTS, StepTotals
from serving.errors import UserError

BASIS = EfficiencyBasis(
    hardware="box", peak_flops=1e11, peak_source="measured", flops_per_token=2e7, devices=2
)
HW = HardwareSpec(
    name="box", peak_flops=1e11, measured_flops=1e11, hbm_gb=16, hbm_bandwidth_gb_s=10,
    intra_node_gb_s=10, inter_node_gb_s=10, gpus_per_node=1,
)  # fmt: skip
# Seconds per step of each part: fixed + per decode row + per prompt chunk + per prompt token.
# (PARTS order; `overlapped` zero: one micro-batch, nothing in flight beside the engine's compute)
COST = np.array([[4, 0.3, 2, 0.02], [1, 0.4, 0.5, 0.03], [3, 0.05, 2, 0.0], [0.5, 0.1, 0.2, 0],
                 [0, 0, 0, 0], [1, 0.0, 0.0, 0.0]]) * 1e-3  # fmt: skip


def report(path, batch: int, seed: int) -> str:
    """A bench report of steps around decode batch `batch` (as `moe-serve bench --json` writes)."""
    rng = np.random.default_rng(seed)
    totals = StepTotals()
    for _ in range(200):
        rows = max(1, batch - int(rng.integers(0, 2)))
        calls = int(rng.random() < 0.2)
        tokens = 16 * calls
        totals.add_step(COST @ np.array([1.0, rows, calls, tokens]), rows, calls, tokens, [])
    efficiency = {
        "basis": BASIS.model_dump(),
        "measured": measure(totals, BASIS).model_dump(),
        "step_model": fit(totals).model_dump(),
        "totals": totals.to_json(),
    }
    path.write_text(json.dumps({"completed": 1, "efficiency": efficiency}))
    return str(path)


def true_rate(rows: float, calls: float, tokens: float) -> float:
    wall = float((COST @ np.array([1.0, rows, calls, tokens])).sum())
    return (rows + tokens) / (wall * 1000) / BASIS.devices


def test_a_pooled_sweep_predicts_a_batch_between_its_loads(tmp_path):
    low, high = report(tmp_path / "a.json", 2, 0), report(tmp_path / "b.json", 16, 1)
    cal = load_calibration([low, high])
    assert cal.step_model.steps == 400
    p = prediction(cal, HW, 8, (0.2, 3.2))
    assert p.tokens_per_ms_per_device == pytest.approx(true_rate(8, 0.2, 3.2), rel=1e-6)
    options = calibrated_options(PlanOptions(), p, "a.json,b.json")
    assert options.measured_from == "a.json,b.json"
    assert options.kernel == pytest.approx(p.factors.kernel)


def test_the_plan_must_be_for_the_hardware_the_report_measured(tmp_path):
    cal = load_calibration(report(tmp_path / "a.json", 4, 0))
    with pytest.raises(UserError, match="measured on 'box'"):
        prediction(cal, HW.model_copy(update={"name": "h200"}))


@pytest.mark.parametrize(
    "content, message",
    [("{not json", "not JSON"), ('{"completed": 3}', "no efficiency measurement")],
)
def test_a_report_without_a_measurement_is_one_line(tmp_path, content, message):
    path = tmp_path / "r.json"
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        load_calibration(str(path))
    with pytest.raises(UserError, match="cannot read"):
        load_calibration(str(tmp_path / "missing.json"))


def test_totals_pool_and_unpool():
    a, b = StepTotals(), StepTotals()
    a.add_step(np.ones(len(PARTS)), 4, 0, 0, [0.1])
    b.add_step(np.full(len(PARTS), 2.0), 8, 1, 16, [0.2, 0.3])
    pooled = a + b
    assert (pooled.steps, pooled.decode_rows, pooled.prefill_tokens) == (2, 12, 16)
    back = pooled - b
    assert (back.steps, back.decode_rows, back.wall_s) == (1, 4, pytest.approx(a.wall_s))
    assert back.moments == pytest.approx(a.moments) and back.cross == pytest.approx(a.cross)
    assert pooled.shard_s.tolist() == pytest.approx([0.3, 0.3])
