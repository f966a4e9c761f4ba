"""`moe-serve balance`: how even would shard load be, before and after expert placement?

The load is either synthetic or recorded:
- `--simulate zipf:S`: expert popularity ~ 1 / rank^S, ranks shuffled per layer by a seeded random
  permutation (so the hot expert sits on a different shard in every layer). T tokens per layer each
  pick 2 distinct experts (top-2) by sampling without replacement from that popularity: a sampled
  window like the one the running system records, not expected counts.
- `--trace FILE`: JSON `{"tokens_per_expert": [[...], ...]}`, one list per MoE layer, as the
  ExpertLoadBalancer exports it.

"Before" is E experts dealt round-robin over N shards with no copies; "after" is router.placement
with R redundant slots, computed from the same load. Every figure printed is the worst over layers.
For a simulated load the placement is also scored on a fresh sample of the same distribution, since
a placement computed from one window serves the next.

Shape legend:
# L layers, E logical experts, N shards, T tokens, K top-k
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from router.balancer import TARGET_CV, cv, max_over_mean
from router.placement import Placement, check_sizes, initial_placement, place_layers, shard_load
from serving.errors import UserError

TOP_K = 2  # Mixtral's top-2 routing
_SAMPLE_CHUNK = 65536  # tokens sampled at once: bounds memory at chunk x E probabilities


def add_subcommand(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "balance", help="place experts on shards for a Zipf or recorded load; show CV and max/mean"
    )
    p.add_argument("--simulate", metavar="zipf:S", help="synthetic load, e.g. zipf:1.2")
    p.add_argument("--trace", metavar="FILE", help='recorded load: {"tokens_per_expert": [[...]]}')
    p.add_argument("--experts", type=int, help="logical experts E (needed with --simulate)")
    p.add_argument("--shards", type=int, required=True, help="shards N")
    p.add_argument("--redundant", type=int, default=0, help="redundant slots R (default 0)")
    p.add_argument("--tokens", type=int, default=16384, help="tokens per layer (simulate)")
    p.add_argument("--layers", type=int, default=4, help="MoE layers (simulate)")
    p.add_argument("--seed", type=int, default=0, help="random seed (simulate)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # 1. Load: [L, E] tokens per expert, and for a simulation a fresh sample to score against.
    fresh = None
    if (args.simulate is None) == (args.trace is None):
        raise UserError("give exactly one of --simulate zipf:S or --trace FILE")
    if args.simulate is not None:
        load, fresh = _simulate(args)
    else:
        load = _read_trace(args.trace, args.experts)
    num_experts = load.shape[1]
    _check_placement_args(num_experts, args.shards, args.redundant)
    # 2. Place: before is round-robin without copies, after uses the load and R redundant slots.
    before = initial_placement(num_experts, args.shards)
    after = place_layers(load, args.shards, args.redundant)
    report = _report(args, load, before, after, fresh)
    print(json.dumps(report) if args.json else _format(report))
    return 0


def zipf_load(
    exponent: float, num_experts: int, num_tokens: int, num_layers: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled top-2 Zipf load: -> (tokens_per_expert [L, E], popularity [L, E]).

    Popularity of the expert at rank r (1-based) is r^-S / sum; each layer shuffles the ranks.
    """
    ranks = torch.arange(1, num_experts + 1, dtype=torch.float64)
    popularity = ranks.pow(-exponent)
    popularity /= popularity.sum()  # [E] by rank
    probs = torch.stack(
        [popularity[torch.randperm(num_experts, generator=generator)] for _ in range(num_layers)]
    )  # [L, E]
    return sample_top_k(probs, num_tokens, generator), probs


def sample_top_k(probs: torch.Tensor, num_tokens: int, generator: torch.Generator) -> torch.Tensor:
    """probs [L, E] -> tokens_per_expert [L, E]: T tokens per layer, K distinct experts each."""
    out = torch.zeros(probs.shape, dtype=torch.float64)
    for layer, row in enumerate(probs.float()):
        for start in range(0, num_tokens, _SAMPLE_CHUNK):
            chunk = min(_SAMPLE_CHUNK, num_tokens - start)
            picks = torch.multinomial(row.expand(chunk, -1), TOP_K, generator=generator)  # [T, K]
            out[layer] += torch.bincount(picks.flatten(), minlength=row.numel())
    return out


def _simulate(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    exponent = _parse_zipf(args.simulate)
    if args.experts is None or args.experts < TOP_K:
        raise UserError(f"--simulate needs --experts E with E >= {TOP_K} (top-{TOP_K} routing)")
    if args.tokens < 1 or args.layers < 1:
        raise UserError("--tokens and --layers must be at least 1")
    generator = torch.Generator().manual_seed(args.seed)
    load, probs = zipf_load(exponent, args.experts, args.tokens, args.layers, generator)
    return load, sample_top_k(probs, args.tokens, generator)


def _parse_zipf(spec: str) -> float:
    kind, _, value = spec.partition(":")
    try:
        exponent = float(value)
    except ValueError:
        exponent = math.nan
    if kind != "zipf" or not math.isfinite(exponent) or exponent < 0:
        raise UserError(f"--simulate {spec!r}: expected zipf:S with S >= 0, e.g. zipf:1.2")
    return exponent


def _read_trace(path: str, num_experts: int | None) -> torch.Tensor:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as exc:
        raise UserError(f"--trace {path}: cannot read it ({exc.strerror})") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"--trace {path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    rows = data.get("tokens_per_expert") if isinstance(data, dict) else None
    shape_ok = isinstance(rows, list) and rows and all(isinstance(r, list) and r for r in rows)
    if not shape_ok or len({len(r) for r in rows}) != 1:
        raise UserError(
            f'--trace {path}: expected {{"tokens_per_expert": [[...], ...]}}, one non-empty list '
            "per MoE layer, all of the same length"
        )
    numbers = all(isinstance(x, int | float) and not isinstance(x, bool) for r in rows for x in r)
    load = torch.tensor(rows, dtype=torch.float64) if numbers else None
    if load is None or not torch.isfinite(load).all() or (load < 0).any():
        raise UserError(f"--trace {path}: token counts must be finite non-negative numbers")
    if num_experts is not None and num_experts != load.shape[1]:
        raise UserError(f"--experts {num_experts} does not match the trace's {load.shape[1]}")
    return load


def _check_placement_args(num_experts: int, num_shards: int, num_redundant: int) -> None:
    try:
        check_sizes(num_experts, num_shards, num_redundant)
    except ValueError as exc:
        raise UserError(f"--shards {num_shards} --redundant {num_redundant}: {exc}") from None


def _metrics(placement: Placement, load: torch.Tensor) -> tuple[float, float]:
    shards = shard_load(placement, load)  # [N]
    return cv(shards), max_over_mean(shards)


def _report(
    args: argparse.Namespace,
    load: torch.Tensor,
    before: Placement,
    after: list[Placement],
    fresh: torch.Tensor | None,
) -> dict:
    """Per-layer figures and their worst over layers, as one JSON-ready dict."""
    layers = []
    for layer, placement in enumerate(after):
        cv_before, mom_before = _metrics(before, load[layer])
        cv_after, mom_after = _metrics(placement, load[layer])
        row = {
            "layer": layer,
            "cv_before": cv_before,
            "cv_after": cv_after,
            "max_over_mean_before": mom_before,
            "max_over_mean_after": mom_after,
            "replica_counts": placement.replica_counts.tolist(),
        }
        if fresh is not None:
            row["cv_after_fresh"], row["max_over_mean_after_fresh"] = _metrics(
                placement, fresh[layer]
            )
        layers.append(row)
    worst = max(layers, key=lambda r: r["cv_after"])
    report = {
        "source": args.simulate if args.simulate is not None else args.trace,
        "experts": load.shape[1],
        "shards": args.shards,
        "redundant": args.redundant,
        "slots_per_shard": after[0].slots_per_shard(),
        "layers": load.shape[0],
        "pairs_per_layer": [float(x) for x in load.sum(1)],  # token-expert pairs, T*K
        "target_cv": TARGET_CV,
        "worst_layer": worst["layer"],
    }
    metric_keys = [k for k in layers[0] if k not in ("layer", "replica_counts")]
    report.update({k: max(r[k] for r in layers) for k in metric_keys})
    report["meets_target_cv"] = report["cv_after"] <= TARGET_CV
    report["per_layer"] = layers
    return report


def _format(r: dict) -> str:
    spread = "/".join(str(n) for n in sorted(set(r["slots_per_shard"]), reverse=True))
    copies = r["per_layer"][r["worst_layer"]]["replica_counts"]
    lines = [
        f"load {r['source']}: {r['layers']} layers, {r['experts']} experts, {r['shards']} shards, "
        f"{r['redundant']} redundant slots ({spread} slots per shard)",
        "worst layer            before    after",
        f"  CV across shards   {r['cv_before']:8.3f} {r['cv_after']:8.3f}   "
        f"(target {r['target_cv']}: {'met' if r['meets_target_cv'] else 'missed'})",
        f"  max/mean           {r['max_over_mean_before']:8.3f} {r['max_over_mean_after']:8.3f}",
    ]
    if "cv_after_fresh" in r:
        lines.append(
            f"  after, on a fresh sample: CV {r['cv_after_fresh']:.3f}, "
            f"max/mean {r['max_over_mean_after_fresh']:.3f}"
        )
    lines.append(
        f"  copies per expert (layer {r['worst_layer']}): most {max(copies)}, "
        f"{sum(c > 1 for c in copies)} experts replicated"
    )
    return "\n".join(lines)
