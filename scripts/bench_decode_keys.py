"""A decode step with its keys read from the KV cache as one view against gathered by slot.

    .venv/bin/python scripts/bench_decode_keys.py [--batch 16] [--contexts 128 512 2048]
        [--rounds 25]

Loads the engine-speed checkpoint (scripts/bench_peer.py writes it) in process on one thread (the
engine's setting on 2 cores), fills `--batch` cache slots with prompts of each context length,
then times decode steps whose rows sit in consecutive slots, as the scheduler packs them: read as
a view of the cache, and gathered by slot as rows in scattered slots must be (the same step with
`decode_first_slot` cleared), in interleaved rounds; and what the scheduler pays once to keep
them consecutive when a sequence finishes below others (`move_ms`: one sequence's keys and values
copied down into the hole, every layer). Prints one JSON object: median ms.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench_peer  # noqa: E402
from bench_fanout import phase  # noqa: E402

from serving import load_model  # noqa: E402
from serving.engine.step_batch import step_batch  # noqa: E402


def step_ms(model, batch: int, context: int, rounds: int) -> dict:
    cache = model.new_cache(batch, context + 8)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, context), generator=g)
    model(ids, cache=cache, slots=torch.arange(batch))
    view = step_batch([(int(ids[b, -1]), b, context) for b in range(batch)], [])
    assert view.decode_first_slot == 0
    ways = {"view": view, "gathered": replace(view, decode_first_slot=None)}
    ms = phase({name: (lambda b=b: model.step(b, cache)) for name, b in ways.items()}, rounds, 3)
    ms |= phase({"move": lambda: cache.move(batch - 1, 0, context)}, rounds, 3)
    out = {f"{name}_ms": round(v, 2) for name, v in ms.items()}
    return out | {"gathered_over_view": round(out["gathered_ms"] / out["view_ms"], 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--contexts", type=int, nargs="+", default=[128, 512, 2048])
    ap.add_argument("--rounds", type=int, default=25)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = load_model(bench_peer.write_checkpoint(bench_peer.OUT / "ckpt"))
    with torch.inference_mode():
        by_context = {str(c): step_ms(model, args.batch, c, args.rounds) for c in args.contexts}
    print(json.dumps({"batch": args.batch, "threads": 1, "step_by_context": by_context}))


if __name__ == "__main__":
    main()
