"""Whole steps with one engine choice made two ways, side by side in one process.

    .venv/bin/python scripts/bench_step_variants.py [--variant prefetch|moe-steps|rope|huge-pages]
        [--batch 16] [--context 128] [--rounds 6]

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
  huge-pages the weights packed on 2 MiB pages (experts/cpu_kernels.py `set_huge_pages`) against
             4 KiB pages: the checkpoint loaded twice, once each way, each with its own cache.
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


def steps(model, batch: int, context: int, rounds: int):
    """(decode, prefill) over `model` with a cache of its own: decode steps at `batch` rows after
    prompts of `context` tokens, and a 512-token prefill step (4 prompts of 128)."""
    vocab = model.config.vocab_size
    cache = model.new_cache(batch + 4, context + 11 * rounds * 2 + 8)
    model(torch.randint(3, vocab, (batch, context)), cache=cache)  # the prompts, in the cache
    ids, position = torch.randint(3, vocab, (batch, 1)), [context]

    def decode() -> None:
        model(ids, cache=cache, start_pos=position[0], slots=torch.arange(batch), last_only=True)
        position[0] += 1

    prompts = torch.randint(3, vocab, (4, 128))

    def prefill() -> None:
        model(prompts, cache=cache, start_pos=0, slots=torch.arange(batch, batch + 4),
              last_only=True)  # fmt: skip

    return decode, prefill


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", choices=["prefetch", "moe-steps", "rope", "huge-pages"],
                    default="moe-steps")  # fmt: skip
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args()
    torch.set_num_threads(1)
    ckpt = bench_peer.write_checkpoint(bench_peer.OUT / "ckpt")
    model = load_model(ckpt)
    if prefetch._decided is None:
        sys.exit("bench_step_variants: the CPU kernels are not in use here (nothing to compare)")
    work = {"": steps(model, args.batch, args.context, args.rounds)}
    if args.variant == "huge-pages":
        cpu_kernels.set_huge_pages(False)
        work = {"2 MiB pages": work[""], "4 KiB pages": steps(load_model(ckpt), args.batch,
                                                              args.context, args.rounds)}  # fmt: skip
        choices = {name: lambda: None for name in work}
    else:
        choices = settings(args.variant)
    rounds: dict[str, list[float]] = {}
    for r in range(args.rounds):
        for name in list(choices)[:: 1 if r % 2 == 0 else -1]:
            choices[name]()
            decode, prefill = work.get(name, work.get(""))
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
