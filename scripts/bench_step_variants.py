"""Whole steps with one engine choice made two ways, side by side in one process.

    .venv/bin/python scripts/bench_step_variants.py [--variant prefetch|moe-steps|rope] [--batch 16]
        [--context 128] [--rounds 6]

Loads the engine-speed checkpoint (scripts/bench_peer.py writes it) in process on one thread (the
engine's setting on 2 cores), then times, in interleaved rounds, decode steps at `--batch` rows
and a 512-token prefill step (4 prompts of 128) under the two settings of a variant:
  prefetch   the CPU kernel's prefetch as tuned at load, apart for calls of at most one register
             tile of rows and of more (experts/prefetch.py), against the few-rows setting for
             both (one setting measured at a decode step's rows, as before the regimes were told
             apart).
  moe-steps  the MoE layer's gating, grouping and combine as one C++ call each
             (serving/engine/moe_layer.py FUSED) against router/'s torch operators.
  rope       RoPE on q and k in place in one C++ call (serving/engine/model.py FUSED_ROPE)
             against apply_rope's torch operators.
Prints one JSON object: median ms of each, and each round's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench_peer  # noqa: E402
from profile_step import timed  # noqa: E402  (median ms of a step, after one to warm up)

from experts import cpu_kernels, prefetch  # noqa: E402
from serving import load_model  # noqa: E402
from serving.engine import model as model_module  # noqa: E402
from serving.engine import moe_layer  # noqa: E402


def settings(variant: str) -> dict:
    """Name -> a function that puts the engine in that setting."""
    if variant == "moe-steps":
        return {"C++": lambda: setattr(moe_layer, "FUSED", True),
                "torch operators": lambda: setattr(moe_layer, "FUSED", False)}  # fmt: skip
    if variant == "rope":
        return {"C++": lambda: setattr(model_module, "FUSED_ROPE", True),
                "torch operators": lambda: setattr(model_module, "FUSED_ROPE", False)}  # fmt: skip
    few, many = prefetch._decided

    def both(a: bool, b: bool):
        return lambda: (cpu_kernels.set_prefetch(a), cpu_kernels.set_prefetch(b, many=True))

    return {"tuned": both(few, many), "one setting": both(few, few)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", choices=["prefetch", "moe-steps", "rope"], default="moe-steps")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = load_model(bench_peer.write_checkpoint(bench_peer.OUT / "ckpt"))
    if prefetch._decided is None:
        sys.exit("bench_step_variants: the CPU kernels are not in use here (nothing to compare)")
    b, vocab = args.batch, model.config.vocab_size
    cache = model.new_cache(b + 4, args.context + 11 * args.rounds * 2 + 8)
    model(torch.randint(3, vocab, (b, args.context)), cache=cache)  # the prompts, in the cache
    ids, position = torch.randint(3, vocab, (b, 1)), [args.context]

    def decode() -> None:
        model(ids, cache=cache, start_pos=position[0], slots=torch.arange(b), last_only=True)
        position[0] += 1

    prompts = torch.randint(3, vocab, (4, 128))

    def prefill() -> None:
        model(prompts, cache=cache, start_pos=0, slots=torch.arange(b, b + 4), last_only=True)

    choices = settings(args.variant)
    rounds: dict[str, list[float]] = {}
    for r in range(args.rounds):
        for name in list(choices)[:: 1 if r % 2 == 0 else -1]:
            choices[name]()
            rounds.setdefault(f"decode {name}", []).append(round(timed(decode, 10), 2))
            rounds.setdefault(f"prefill {name}", []).append(round(timed(prefill, 2), 2))
    print(json.dumps({
        "command": " ".join(["scripts/bench_step_variants.py", *sys.argv[1:]]),
        "machine": bench_peer.machine(),
        "prefetch_tuned": {f"at most {cpu_kernels.tile_rows()} rows": prefetch._decided[0],
                           f"more than {cpu_kernels.tile_rows()} rows": prefetch._decided[1]},
        "median_ms": {k: round(statistics.median(v), 2) for k, v in rounds.items()},
        "rounds_ms": rounds,
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
