"""Calibration: the planner's assumed factors replaced by factors measured on a running deployment.

`moe-serve bench --json` against a moe-serve server records, beside its client-side figures, an
`efficiency` section: the step accounting of exactly the benchmark's window (serving/control/steptime.py),
the basis that turns it into planner terms, the measured factors and the fitted step model
(serving/control/efficiency.py). Here such a report becomes plan options:

  1. the step model predicts every part's seconds per step at the batch asked for (by default the
     report's own), keeping the report's mix of prompt and decode tokens per decode row;
  2. those seconds give the four factors (M1-M2) against the peak of the hardware being planned,
     which must be the hardware the report was measured on;
  3. plan() then derives realistic tokens/ms = ceiling x product, which equals the predicted
     tokens/ms per device (the peak cancels).

Several reports (a sweep of loads) pool into one calibration: their step totals add, and the
step model is fitted over all their steps, so it spans their batch sizes instead of extrapolating
from one (measured: one load's narrow spread of batch sizes extrapolates poorly; BENCHMARKS.md).

`moe-serve plan --calibrate REPORT.json [--calibrate MORE.json ...]` prints the calibrated plan
with predicted vs measured tokens/ms; `--check OTHER.json` also predicts at another report's batch
and compares it with what that report measured. The serve config's `calibration` makes the
controller's phase targets come from the calibrated plan.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from serving.control.capacity import HardwareSpec, PlanOptions
from serving.control.efficiency import (
    EfficiencyBasis,
    Measured,
    StepModel,
    fit,
    measure,
    predict,
    relative_error,
)
from serving.control.steptime import StepTotals
from serving.errors import UserError


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


class Calibration(Frozen):
    """The parts of a bench report's `efficiency` section that calibration reads."""

    basis: EfficiencyBasis
    measured: Measured  # the benchmark's window, as measured by the engine
    step_model: StepModel
    totals: dict  # serving.steptime.StepTotals.to_json(): what pooling adds up


def load_calibration(paths: str | Path | list) -> Calibration:
    """One or more `moe-serve bench --json` reports of one deployment -> their pooled
    Calibration (totals added, the step model refitted over every step); one-line UserError."""
    if isinstance(paths, (str, Path)):
        return _load_one(paths)
    cals = [_load_one(p) for p in paths]
    if len(cals) == 1:
        return cals[0]
    first = cals[0]
    for path, cal in zip(paths[1:], cals[1:], strict=True):
        if cal.basis.model_dump(exclude={"peak_flops", "peak_source"}) != first.basis.model_dump(
            exclude={"peak_flops", "peak_source"}
        ):
            raise UserError(f"{path}: measured on another deployment than {paths[0]}")
    totals = StepTotals.from_json(first.totals)
    for cal in cals[1:]:
        totals = totals + StepTotals.from_json(cal.totals)
    return Calibration(
        basis=first.basis,
        measured=measure(totals, first.basis),
        step_model=fit(totals),
        totals=totals.to_json(),
    )


def _load_one(path: str | Path) -> Calibration:
    try:
        report = json.loads(Path(path).read_text())
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None
    except ValueError as exc:
        raise UserError(f"{path}: not JSON ({exc})") from None
    section = report.get("efficiency") if isinstance(report, dict) else None
    if not isinstance(section, dict) or section.get("step_model") is None:
        raise UserError(
            f"{path}: no efficiency measurement: write it with `moe-serve bench --json` against a "
            "moe-serve server, with enough load for at least 3 steps"
        )
    try:
        return Calibration.model_validate(section)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise UserError(f"{path}: efficiency.{where}: {err['msg']}") from None


def batch_mix(cal: Calibration, decode_rows: float | None) -> tuple[float, float, float]:
    """(decode rows, prefill calls, prefill tokens) per step at `decode_rows` (None: the
    report's own batch), with the report's prompt calls and tokens per decode row."""
    m = cal.step_model
    if decode_rows is None or m.decode_rows_per_step <= 0:
        return m.decode_rows_per_step, m.prefill_calls_per_step, m.prefill_tokens_per_step
    scale = decode_rows / m.decode_rows_per_step
    return float(decode_rows), m.prefill_calls_per_step * scale, m.prefill_tokens_per_step * scale


def prediction(
    cal: Calibration,
    hardware: HardwareSpec,
    decode_rows: float | None = None,
    prefill: tuple[float, float] | None = None,
    flops_per_token: float | None = None,
) -> Measured:
    """Steps 1-2: the breakdown and factors expected at a batch, against `hardware`'s peak
    (prefill (calls, tokens) per step: as given, else in the report's proportion). With the
    planned model's FLOPs per token, the report must have measured that model."""
    if flops_per_token and abs(flops_per_token / cal.basis.flops_per_token - 1) > 0.01:
        raise UserError(
            f"--calibrate: the report measured a model of {cal.basis.flops_per_token:.4g} FLOPs "
            f"per token, the plan is for one of {flops_per_token:.4g}; use a report of this model"
        )
    if hardware.name != cal.basis.hardware:
        raise UserError(
            f"--calibrate: the report was measured on {cal.basis.hardware!r}, the plan is for "
            f"{hardware.name!r}; calibrate with a report from the same hardware"
        )
    peak, source = hardware.peak()
    basis = cal.basis.model_copy(update={"peak_flops": peak, "peak_source": source})
    rows, calls, tokens = batch_mix(cal, decode_rows)
    calls, tokens = prefill if prefill is not None else (calls, tokens)
    try:
        return predict(cal.step_model, basis, rows, tokens, calls)
    except ValueError as exc:
        raise UserError(f"--calibrate: {exc}") from None


def calibrated_options(
    options: PlanOptions, predicted: Measured, reports: str | Path | list
) -> PlanOptions:
    """Step 3: plan options whose four factors are the predicted ones, measured in `reports`."""
    source = ",".join(map(str, reports)) if isinstance(reports, list) else str(reports)
    f = predicted.factors
    if f.kernel <= 0:
        raise UserError(f"{source}: the report measured no compute time; cannot calibrate")
    return options.model_copy(
        update={
            "kernel": min(1.0, f.kernel),
            "communication": f.communication,
            "load_imbalance": f.load_imbalance,
            "pipeline_bubbles": f.pipeline_bubbles,
            "measured_from": source,
        }
    )


def summary(
    cal: Calibration, predicted: Measured, hardware: HardwareSpec, check: Calibration | None
) -> dict:
    """What `plan --calibrate` reports beside the plan: measured vs predicted tokens/ms per
    device, at the report's batch, at the planned batch, and at a check report's batch."""
    at_report = prediction(cal, hardware)
    out = {
        "measured_tokens_per_ms_per_device": cal.measured.tokens_per_ms_per_device,
        "calibration_steps": cal.step_model.steps,
        "measured_decode_rows_per_step": cal.measured.decode_rows_per_step,
        "predicted_at_measured_batch": at_report.tokens_per_ms_per_device,
        "planned_decode_rows_per_step": predicted.decode_rows_per_step,
        "predicted_tokens_per_ms_per_device": predicted.tokens_per_ms_per_device,
        "predicted_fractions": predicted.fractions,
    }
    if check is not None:
        rows = check.measured.decode_rows_per_step
        m = check.measured
        other = prediction(
            cal, hardware, rows, (m.prefill_calls_per_step, m.prefill_tokens_per_step)
        )
        measured = check.measured.tokens_per_ms_per_device
        out["check"] = {
            "decode_rows_per_step": rows,
            "predicted_tokens_per_ms_per_device": other.tokens_per_ms_per_device,
            "measured_tokens_per_ms_per_device": measured,
            "relative_error": relative_error(other.tokens_per_ms_per_device, measured),
        }
    return out
