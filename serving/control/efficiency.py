"""Measured efficiency in the planner's own terms, and the step-time model calibration uses.

The planner (serving/control/capacity.py) writes efficiency = kernel x (1 - communication) x
(1 - load imbalance) x (1 - pipeline bubbles) and assumes the factors. Here they are measured from
the step accounting (serving/control/steptime.py), over a window of W seconds of steps on n devices that
processed N tokens (prompt and generated) of F = 2 x active params FLOPs each:

  M1 bubbles        = bubble / W
     load imbalance = imbalance / (W - bubble)
     communication  = transport / (W - bubble - imbalance)
     so that (1 - communication)(1 - imbalance)(1 - bubbles) = (dense + expert) / W, the share
     of the step spent computing.
  M2 kernel = N x F / ((dense + expert) x n x peak): the FLOP/s achieved while computing, per
     device, over the peak the planner uses.
  M3 efficiency = the product = N x F / (W x n x peak) = (N / W / n) / ceiling: measured tokens/ms
     per device over the ceiling. The identity holds by construction over the accounted time; it
     is checked against tokens counted by a client over wall time, which catches time the
     accounting misses.
  M4 step model: each part's seconds per step = c0 + c1 x decode rows + c2 x prefill calls
     + c3 x prefill tokens, least squares over the window's steps, slopes kept non-negative (a
     negative cost per row is collinearity, not physics: such a term is dropped and the rest
     refitted). At another batch it predicts every part, hence the factors and tokens/ms there
     (`predict`); a fixed cost per step and per forward call is what makes small batches
     inefficient, which constant factors cannot express.
"""

from __future__ import annotations

import math

import numpy as np
from pydantic import BaseModel, ConfigDict

from serving.control.capacity import EfficiencyFactors, Plan, ceiling_tokens_per_ms
from serving.control.steptime import PARTS, REGRESSORS, StepTotals


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class EfficiencyBasis(Frozen):
    """What turns seconds into planner terms: the hardware's peak, the model's FLOPs per token,
    and the devices the work ran on (as the controller counts them)."""

    hardware: str
    peak_flops: float
    peak_source: str  # "measured" or "spec", as the plan says
    flops_per_token: float  # 2 x active params
    devices: int

    @property
    def ceiling_tokens_per_ms(self) -> float:
        return ceiling_tokens_per_ms(self.peak_flops, self.flops_per_token / 2.0)


def basis_from_plan(plan: Plan, devices: int) -> EfficiencyBasis:
    """The basis of a deployment planned by `plan`, running on `devices` devices now."""
    return EfficiencyBasis(
        hardware=plan.hardware,
        peak_flops=plan.peak_flops_used,
        peak_source=plan.peak_source,
        flops_per_token=2.0 * plan.active_params,
        devices=devices,
    )


class Measured(Frozen):
    """The breakdown and factors of one window (or a prediction at some batch)."""

    window_s: float  # accounted step time
    steps: int
    decode_rows_per_step: float
    prefill_tokens_per_step: float
    prefill_calls_per_step: float = 0.0
    tokens_per_ms_per_device: float  # prompt + generated tokens, the planner's unit
    ceiling_tokens_per_ms: float
    fractions: dict[str, float]  # PARTS -> share of the window, summing to 1
    factors: EfficiencyFactors
    efficiency: float  # the factors' product
    achieved_flops_per_device: float  # while computing (dense + expert)
    shard_compute_fraction: list[float] = []  # each shard's compute / window (busy share)


def factors_from(seconds: dict[str, float], tokens: float, basis: EfficiencyBasis) -> tuple:
    """M1-M2: seconds per part over a window -> (EfficiencyFactors, achieved FLOP/s per device)."""
    wall = sum(seconds.values())
    bubble, imbalance = seconds["bubble"], seconds["imbalance"]
    compute = seconds["dense"] + seconds["expert"] + seconds.get("overlapped", 0.0)
    achieved = tokens * basis.flops_per_token / (compute * basis.devices) if compute > 0 else 0.0
    factors = EfficiencyFactors(
        kernel=achieved / basis.peak_flops,
        communication=_share(seconds["transport"], wall - bubble - imbalance),
        load_imbalance=_share(imbalance, wall - bubble),
        pipeline_bubbles=_share(bubble, wall),
    )
    return factors, achieved


def _share(part: float, whole: float) -> float:
    return part / whole if whole > 0 else 0.0


def measure(totals: StepTotals, basis: EfficiencyBasis) -> Measured | None:
    """M1-M3 over a window's totals; None without accounted time."""
    if totals.wall_s <= 0 or totals.steps == 0:
        return None
    seconds = {p: totals.part(p) for p in PARTS}
    counts = (totals.decode_rows, totals.prefill_calls, totals.prefill_tokens)
    shard_compute = [float(s) / totals.wall_s for s in totals.shard_s]
    return _measured(seconds, totals.steps, *counts, basis, shard_compute)


def _measured(
    seconds: dict[str, float],
    steps: int,
    decode_rows: float,
    prefill_calls: float,
    prefill_tokens: float,
    basis: EfficiencyBasis,
    shard_compute: list[float] | None = None,
) -> Measured:
    """M1-M3 from seconds per part and what ran in them (totals over `steps` steps)."""
    wall, tokens = sum(seconds.values()), decode_rows + prefill_tokens
    factors, achieved = factors_from(seconds, tokens, basis)
    return Measured(
        window_s=wall,
        steps=steps,
        decode_rows_per_step=decode_rows / steps,
        prefill_tokens_per_step=prefill_tokens / steps,
        prefill_calls_per_step=prefill_calls / steps,
        tokens_per_ms_per_device=tokens / (wall * 1000.0) / basis.devices,
        ceiling_tokens_per_ms=basis.ceiling_tokens_per_ms,
        fractions={p: s / wall for p, s in seconds.items()},
        factors=factors,
        efficiency=factors.product(),
        achieved_flops_per_device=achieved,
        shard_compute_fraction=shard_compute or [],
    )


class StepModel(Frozen):
    """M4: seconds per step of each part = c . (1, decode rows, prefill calls, prefill tokens)."""

    coefficients: dict[str, tuple[float, float, float, float]]  # part -> c (REGRESSORS order)
    decode_rows_per_step: float  # the fitted window's means, where the model is surest
    prefill_calls_per_step: float
    prefill_tokens_per_step: float
    steps: int

    def seconds(self, decode_rows: float, prefill_calls: float, prefill_tokens: float) -> dict:
        r = (1.0, decode_rows, prefill_calls, prefill_tokens)
        return {p: max(0.0, sum(c * x for c, x in zip(cs, r, strict=True)))
                for p, cs in self.coefficients.items()}  # fmt: skip


def fit(totals: StepTotals) -> StepModel | None:
    """M4 by least squares from the window's moments. A regressor that never varied in the window
    (e.g. no prefill at all) gets no coefficient of its own: its effect stays in c0. None with
    fewer than 4 steps."""
    n = totals.steps
    if n < len(REGRESSORS):
        return None
    mean = totals.moments[0] / n  # [R] means of the regressors
    var = np.diag(totals.moments) / n - mean**2
    varied = [i for i in range(1, len(REGRESSORS)) if var[i] > 1e-9 * max(1.0, mean[i] ** 2)]
    coef = np.zeros((len(REGRESSORS), len(PARTS)))  # [R, P]
    for j in range(len(PARTS)):
        used = [0, *varied]
        while True:  # 1. solve; 2. drop the most negative slope; until none is negative
            c = np.linalg.lstsq(totals.moments[np.ix_(used, used)], totals.cross[used, j],
                                rcond=None)[0]  # fmt: skip
            worst = min(range(1, len(used)), key=lambda k: c[k], default=None)
            if worst is None or c[worst] >= 0:
                break
            used.pop(worst)
        coef[used, j] = c
    return StepModel(
        coefficients={p: tuple(float(c) for c in coef[:, j]) for j, p in enumerate(PARTS)},
        decode_rows_per_step=float(mean[1]),
        prefill_calls_per_step=float(mean[2]),
        prefill_tokens_per_step=float(mean[3]),
        steps=n,
    )


def predict(
    model: StepModel,
    basis: EfficiencyBasis,
    decode_rows: float,
    prefill_tokens: float,
    prefill_calls: float = 0.0,
) -> Measured:
    """The breakdown, factors and tokens/ms per device the step model expects at a batch of
    `decode_rows` decode rows, `prefill_calls` prompt chunks of `prefill_tokens` tokens in all
    per step."""
    seconds = model.seconds(decode_rows, prefill_calls, prefill_tokens)
    if sum(seconds.values()) <= 0 or decode_rows + prefill_tokens <= 0:
        raise ValueError("the step model predicts no time or no tokens at this batch")
    return _measured(seconds, 1, decode_rows, prefill_calls, prefill_tokens, basis)


def relative_error(predicted: float, measured: float) -> float:
    """|predicted - measured| / measured (inf when nothing was measured)."""
    return abs(predicted - measured) / measured if measured > 0 else math.inf
