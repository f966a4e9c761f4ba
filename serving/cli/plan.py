"""`moe-serve plan`: load a model and a hardware description, run the planner, print the report.

What --model and --hardware accept is in serving/control/specs.py. Every mistake in a file or
flag becomes one UserError line that names the file and the field.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pydantic import ValidationError

from serving.control import capacity
from serving.control.calibrate import calibrated_options, load_calibration, prediction, summary
from serving.control.capacity import Plan, PlanOptions
from serving.control.specs import load_hardware_spec, load_model_spec
from serving.errors import UserError

# Flags whose names differ from the PlanOptions field they set, for error messages.
FLAGS = {
    "target_tokens_per_ms": "--target",
    "aggregate_target_tokens_per_ms": "--aggregate-target",
}


def _factor(text: str) -> float | str:
    return "derived" if text == "derived" else float(text)


def _options(args: argparse.Namespace) -> PlanOptions:
    try:
        seq_lens = tuple(int(s) for s in args.seq_lens.split(","))
    except ValueError:
        raise UserError(f"--seq-lens {args.seq_lens}: expected integers, e.g. 128,512") from None
    claims = []
    for claim in args.claim:
        name, _, tokens = claim.rpartition("=")
        try:
            claims.append((name or "claim", float(tokens)))
        except ValueError:
            raise UserError(f"--claim {claim}: expected NAME=TOKENS_PER_MS") from None
    losses = ("communication", "load_imbalance", "pipeline_bubbles")
    data = {k: getattr(args, k) for k in ("gpus", "ep", "pp", "micro_batches", "cv")}
    data |= {"batch": args.batch} if args.batch is not None else {}
    data |= {"target_tokens_per_ms": args.target, "seq_lens": seq_lens, "claims": tuple(claims)}
    data["aggregate_target_tokens_per_ms"] = args.aggregate_target
    # --derive first, so that a factor given by its own flag still wins; unset flags keep
    # PlanOptions' defaults (the seed's losses, the kernel they imply): the library owns them.
    data |= dict.fromkeys(losses, "derived") if args.derive else {}
    data |= {k: v for k in ("overlap", "kernel", *losses) if (v := getattr(args, k)) is not None}
    try:
        return PlanOptions.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else ""
        flag = FLAGS.get(field, "--" + field.replace("_", "-")) if field else "options"
        raise UserError(f"{flag}: {err['msg'].removeprefix('Value error, ')}") from None


def render(plan: Plan, markdown: bool = False, extra: list[str] | None = None) -> str:
    """The report: summary, factors, phases, memory, proof and formulas (and a calibration
    section, given `extra` lines); text or Markdown."""
    factors = [
        (k, _num(v, 3), plan.efficiency_factor_sources[k]) for k, v in plan.efficiency_factors
    ]
    memory_title = f"memory per GPU, batch {plan.options.batch}, ep {plan.options.ep}:"
    lines = [f"{'# ' if markdown else ''}Capacity plan: {plan.model} on {plan.hardware}", ""]
    lines += _table(("figure", "value"), _summary_rows(plan), markdown)
    lines += ["", *_table(("factor", "value", "source"), factors, markdown)]
    head = ("phase", "tokens/ms", "feasible", "conditions")
    lines += ["", *_table(head, _phase_rows(plan, markdown), markdown)]
    head = ("seq_len", "weights GB", "KV GB", "activations GB", "total GB", "ckpt", "max batch")
    lines += ["", memory_title, *([""] if markdown else [])]
    lines += _table(head, _memory_rows(plan), markdown)
    sections = [("calibration", extra)] if extra else []
    sections += [("proof", plan.proof), ("formulas", formulas())]
    for title, body in sections:
        lines += ["", f"## {title}" if markdown else f"{title}:"]
        lines += ["```", *body, "```"] if markdown else [f"  {line}" for line in body]
    return "\n".join(lines) + "\n"


def _summary_rows(plan: Plan) -> list[tuple]:
    peak = f"{plan.peak_flops_used / 1e12:.4g} TFLOP/s ({plan.peak_source})"
    rows = [
        ("peak used", peak),
        ("ceiling", f"{_num(plan.ceiling_tokens_per_ms, 1)} tokens/ms per GPU"),
        ("efficiency", _num(plan.efficiency, 3)),
        ("realistic", f"{_num(plan.realistic_tokens_per_ms, 1)} tokens/ms per GPU"),
    ]
    if plan.target_tokens_per_ms is not None:
        verdict = "feasible" if plan.feasible else "INFEASIBLE"
        needs = f"{plan.required_efficiency:.0%} efficiency, {plan.required_scaling:.2f}x realistic"
        rows += [
            ("target", f"{plan.target_tokens_per_ms:.1f} tokens/ms per GPU: {verdict}"),
            ("needs", needs),
            ("risk", plan.risk),
        ]
    if plan.gpus_needed is not None:
        rows.append(("GPUs needed", str(plan.gpus_needed)))
    return rows


def _phase_rows(plan: Plan, markdown: bool) -> list[tuple]:
    rows = []
    for p in plan.phases:
        # Text puts each condition on its own line; a Markdown cell holds them all.
        conditions = ["; ".join(p.conditions)] if markdown else list(p.conditions) or [""]
        feasible = "yes" if p.feasible else "NO"
        rows.append((p.name, _num(p.tokens_per_ms, 1), feasible, conditions[0]))
        rows += [("", "", "", c) for c in conditions[1:]]
    return rows


def _num(x: float, decimals: int) -> str:
    """Fixed decimals, or 3 significant digits where those would round a small figure away
    (a CPU deployment's tokens/ms and efficiency are small)."""
    return f"{x:.{decimals}f}" if abs(x) >= 10.0 ** (1 - decimals) or x == 0 else f"{x:.3g}"


def _memory_rows(plan: Plan) -> list[tuple]:
    return [
        (m.seq_len, *(f"{x:.2f}" for x in (m.weights_gb, m.kv_cache_gb, m.activations_gb)),
         f"{m.total_gb:.2f}", "yes" if m.checkpointing else "no", m.max_batch)
        for m in plan.memory
    ]  # fmt: skip


def _table(headers: tuple, rows: list[tuple], markdown: bool) -> list[str]:
    cells = [tuple(str(c) for c in headers)] + [tuple(str(c) for c in r) for r in rows]
    if markdown:
        rule = "|" + "|".join("---" for _ in headers) + "|"
        out = ["| " + " | ".join(r) + " |" for r in cells]
        return out[:1] + [rule] + out[1:]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]


def formulas() -> list[str]:
    """The formulas section of serving/control/capacity.py's docstring: one source for code and report."""
    lines = capacity.__doc__.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("Formulas"))
    return [line.rstrip() for line in lines[first + 1 :] if line.strip()]


def run(args: argparse.Namespace) -> int:
    model = load_model_spec(args.model)
    hardware = load_hardware_spec(args.hardware)
    options, calibration = _options(args), None
    if args.check and not args.calibrate:
        raise UserError("--check needs --calibrate REPORT.json")
    if args.calibrate:
        cal = load_calibration(args.calibrate)
        flops = 2.0 * model.params().active
        predicted = prediction(cal, hardware, args.batch, flops_per_token=flops)
        options = calibrated_options(options, predicted, args.calibrate)
        check = load_calibration(args.check) if args.check else None
        calibration = summary(cal, predicted, hardware, check)
    result = capacity.plan(model, hardware, options)
    extra = _calibration_lines(args, calibration) if calibration else []
    if args.markdown:
        try:
            Path(args.markdown).write_text(render(result, markdown=True, extra=extra))
        except OSError as exc:
            raise UserError(f"--markdown {args.markdown}: cannot write ({exc.strerror})") from None
    if args.json:
        data = result.model_dump(mode="json") | {"formulas": formulas()}
        print(json.dumps(data | ({"calibration": calibration} if calibration else {}), indent=2))
    else:
        print(render(result, extra=extra), end="")
    return 0


def _calibration_lines(args: argparse.Namespace, c: dict) -> list[str]:
    """Predicted vs measured tokens/ms per device, for the report's `calibration` section."""
    lines = [
        f"measured in {', '.join(args.calibrate)}: {c['measured_tokens_per_ms_per_device']:.4g} "
        f"tokens/ms per device at {c['measured_decode_rows_per_step']:.1f} decode rows per step "
        f"({c['calibration_steps']} steps)",
        f"step model there: {c['predicted_at_measured_batch']:.4g} tokens/ms per device",
        f"planned batch {c['planned_decode_rows_per_step']:.1f} decode rows per step: predicted "
        f"{c['predicted_tokens_per_ms_per_device']:.4g} tokens/ms per device (the realistic figure)",
    ]
    if "check" in c:
        k = c["check"]
        lines.append(
            f"check against {args.check}: predicted {k['predicted_tokens_per_ms_per_device']:.4g}"
            f" at {k['decode_rows_per_step']:.1f} decode rows per step, measured "
            f"{k['measured_tokens_per_ms_per_device']:.4g}: error {k['relative_error']:.1%}"
        )
    return lines


def add_subcommand(sub: argparse._SubParsersAction) -> None:
    """Register `moe-serve plan` on the CLI's subparsers."""
    p = sub.add_parser(
        "plan",
        help="derive ceiling, efficiency, memory and phased targets, with proof",
        description="Derive what a model can do per GPU on given hardware, and prove it.",
    )
    p.add_argument("--model", required=True, help="model YAML, config.json or name (seed-4b)")
    p.add_argument("--hardware", required=True, help="hardware YAML or name (h200), or cpu")
    goal = p.add_mutually_exclusive_group()
    goal.add_argument("--target", type=float, help="target tokens/ms per GPU")
    goal.add_argument("--aggregate-target", type=float, help="target tokens/ms for all GPUs")
    p.add_argument("--gpus", type=int, help="GPUs sharing --aggregate-target")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel size (default 1)")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages (default 1)")
    p.add_argument("--micro-batches", type=int, default=1, help="micro-batches (default 1)")
    p.add_argument("--seq-lens", default="128,512,2048,4096,10240", help="comma-separated")
    p.add_argument(
        "--batch",
        type=int,
        help="sequences per GPU (default 1; with --calibrate, the report's decode rows per step)",
    )
    p.add_argument("--cv", type=float, default=0.15, help="load CV across shards (0.15)")
    p.add_argument("--overlap", type=float, help="fraction of all-to-all hidden (default 0)")
    p.add_argument(
        "--kernel",
        type=float,
        help="kernel efficiency (default 0.90, implied by the seed's 37.7%% overall)",
    )
    for name, seed in (
        ("communication", 0.42),
        ("load-imbalance", 0.12),
        ("pipeline-bubbles", 0.18),
    ):
        p.add_argument(f"--{name}", type=_factor, help=f"loss or 'derived' (default {seed})")
    p.add_argument("--derive", action="store_true", help="derive all three losses (F4-F6)")
    p.add_argument("--claim", action="append", default=[], help="NAME=TOKENS_PER_MS to check")
    p.add_argument(
        "--calibrate",
        metavar="REPORT.json",
        action="append",
        help="replace the four factors by those measured in a `moe-serve bench --json` report "
        "(repeat to pool several loads of one deployment: the step model then spans them)",
    )
    p.add_argument(
        "--check",
        metavar="OTHER.json",
        help="with --calibrate: predict at another bench report's batch and compare",
    )
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    p.add_argument("--markdown", metavar="FILE", help="also write the report as Markdown")
    p.set_defaults(func=run)
