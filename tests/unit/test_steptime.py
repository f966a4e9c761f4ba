"""Step accounting and the measured efficiency factors: pure arithmetic, checked by hand."""

import math

import numpy as np
import pytest

from experts.timing import ExpertTime
from serving.control.efficiency import EfficiencyBasis, fit, measure, predict
from serving.control.steptime import PARTS, StepAccounting, StepTotals, split_step

BASIS = EfficiencyBasis(
    hardware="test", peak_flops=1e12, peak_source="spec", flops_per_token=2e9, devices=2
)


def expert(round_trip, shards_per_layer):
    t = ExpertTime()
    for shard_s in shards_per_layer:
        t.add_layer(round_trip / len(shards_per_layer), shard_s)
    return t


def test_a_step_splits_into_parts_that_sum_to_its_interval():
    # Two layers: shards take (1, 3) and (2, 2) ms; the fan-outs took 10 ms in all.
    t = expert(0.010, [[0.001, 0.003], [0.002, 0.002]])
    parts = dict(zip(PARTS, split_step(0.050, 0.030, t), strict=True))
    assert parts["expert"] == pytest.approx(0.002 + 0.002)  # mean per layer, summed
    assert parts["imbalance"] == pytest.approx(0.001 + 0.0)  # slowest minus mean
    assert parts["transport"] == pytest.approx(0.010 - 0.005)  # round trip minus slowest
    assert parts["dense"] == pytest.approx(0.030 - 0.010)
    assert parts["bubble"] == pytest.approx(0.050 - 0.030)
    assert sum(parts.values()) == pytest.approx(0.050)
    assert t.shard_s == pytest.approx([0.003, 0.005])


def test_jitter_never_makes_a_part_negative():
    t = expert(0.010, [[0.020, 0.001]])  # a shard "took" longer than the round trip
    parts = split_step(0.008, 0.009, t)
    assert (parts >= 0).all() and parts.sum() == pytest.approx(0.008)


def test_window_is_the_difference_of_two_readings():
    now = [0.0]
    acc = StepAccounting(window_s=10.0, clock=lambda: now[0])
    for i in range(30):  # one step a second; the first 10 are slow
        now[0] = float(i)
        step = 0.5 if i < 10 else 0.1
        acc.record(step, step, ExpertTime(), decode_rows=4, prefill_tokens=0)
    window = acc.window()
    assert 9 <= window.steps <= 11  # about the last ten seconds
    assert window.wall_s == pytest.approx(0.1 * window.steps)
    assert acc.totals.steps == 30
    now[0] = 100.0  # a long idle spell: nothing in the window
    assert acc.window().steps == 0 and acc.window().fractions() is None


def test_totals_round_trip_through_json_and_subtract():
    acc = StepAccounting()
    acc.record(0.02, 0.015, expert(0.01, [[0.004, 0.002]]), 8, 16, prefill_calls=1)
    first = acc.totals.copy()
    acc.record(0.03, 0.02, expert(0.01, [[0.004, 0.002]]), 4, 0)
    again = StepTotals.from_json(acc.totals.to_json())
    diff = again - first
    assert (diff.steps, diff.decode_rows, diff.prefill_tokens, diff.prefill_calls) == (1, 4, 0, 0)
    assert again.prefill_calls == 1
    assert diff.wall_s == pytest.approx(0.03)
    assert sum(diff.fractions().values()) == pytest.approx(1.0)


def test_measured_factors_multiply_to_tokens_per_ms_over_the_ceiling():
    acc = StepAccounting()
    rng = np.random.default_rng(0)
    for _ in range(50):
        rows = int(rng.integers(1, 16))
        shard = [0.001 * rows, 0.0015 * rows]
        acc.record(0.004 + 0.002 * rows, 0.003 + 0.0018 * rows, expert(0.0025 * rows, [shard]),
                   rows, 0)  # fmt: skip
    m = measure(acc.totals, BASIS)
    assert sum(m.fractions.values()) == pytest.approx(1.0)
    assert all(0 <= f <= 1 for f in m.fractions.values())
    # M3: the identity, computed two independent ways.
    assert m.efficiency == pytest.approx(m.tokens_per_ms_per_device / m.ceiling_tokens_per_ms)
    assert m.factors.load_imbalance > 0 and m.factors.communication > 0
    assert m.shard_compute_fraction[1] > m.shard_compute_fraction[0]


def test_step_model_recovers_a_linear_cost_and_predicts_another_batch():
    # Each part costs a fixed time per step, per decode row, per prompt chunk (a forward call of
    # its own) and per prompt token.
    fixed = np.array([0.004, 0.001, 0.002, 0.0005, 0.0, 0.001])  # PARTS order
    per_row = np.array([0.0002, 0.0004, 0.00005, 0.0001, 0.0, 0.0])
    per_call = np.array([0.003, 0.0005, 0.002, 0.0003, 0.0, 0.0])
    per_prefill = np.array([0.00002, 0.00004, 0.000005, 0.0, 0.0, 0.0])
    totals = StepTotals()
    rng = np.random.default_rng(1)
    for _ in range(300):
        calls = int(rng.choice([0, 0, 1, 2]))
        rows, prefill = int(rng.integers(1, 9)), 16 * calls + int(rng.integers(0, 8)) * calls
        seconds = fixed + per_row * rows + per_call * calls + per_prefill * prefill
        totals.add_step(seconds, rows, calls, prefill, [])
    model = fit(totals)
    for j, p in enumerate(PARTS):
        want = (fixed[j], per_row[j], per_call[j], per_prefill[j])
        assert model.coefficients[p] == pytest.approx(want, abs=1e-9)
    at16 = predict(model, BASIS, 16, 0)
    wall = float((fixed + per_row * 16).sum())
    assert at16.tokens_per_ms_per_device == pytest.approx(16 / (wall * 1000) / 2)
    assert at16.efficiency == pytest.approx(
        at16.tokens_per_ms_per_device / BASIS.ceiling_tokens_per_ms
    )
    # A fixed per-step cost makes bigger batches more efficient: the step model says so.
    assert at16.efficiency > predict(model, BASIS, 2, 0).efficiency


def test_a_negative_slope_is_collinearity_and_is_dropped():
    # Fewer decode rows exactly when a prompt chunk runs: an unconstrained fit would price a
    # decode row below zero. The fit keeps every slope >= 0 and still matches the mean step.
    totals = StepTotals()
    for i in range(100):
        calls = i % 2
        rows = 4 - calls
        totals.add_step(np.full(len(PARTS), 0.01 + 0.01 * calls), rows, calls, 16 * calls, [])
    model = fit(totals)
    assert all(c >= 0 for cs in model.coefficients.values() for c in cs[1:])
    mean_wall = totals.wall_s / totals.steps
    predicted = sum(model.seconds(3.5, 0.5, 8.0).values())
    assert predicted == pytest.approx(mean_wall, rel=0.05)


def test_a_regressor_that_never_varied_stays_in_the_intercept():
    totals = StepTotals()
    for rows in (2, 4, 6, 8):
        totals.add_step(np.full(len(PARTS), 0.001 * rows), rows, 0, 0, [])  # never any prefill
    model = fit(totals)
    assert all(c[2] == 0.0 and c[3] == 0.0 for c in model.coefficients.values())
    assert not any(math.isnan(c) for cs in model.coefficients.values() for c in cs)
    assert fit(StepTotals()) is None
