"""Expert parallelism on Ray: sharded vs in-process forward, and the per-layer transport overhead.

Prints one JSON object:
  forward: tokens/ms of a prefill (default 8 x 512 = 4096 tokens) with expert_shards=0 and =2
           on the same checkpoint and batch, interleaved rounds, medians, and their ratio;
  transport: per-layer MoE time through the Ray pool (compiled graph, and plain actor calls)
             minus the same experts computed in-process, at several token counts: the cost of
             dispatch + transport + combine.

Usage: python scripts/bench_ep.py [--rounds 5] [--batch 8] [--seq 512] [--shards 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_forward import MODEL, write_checkpoint  # noqa: E402


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def transport_overhead(local, pools: dict, tokens: int, rounds: int) -> dict:
    """Median ms of one layer's experts through each pool, and in-process, for `tokens` tokens."""
    from router.dispatch import group_by_slot
    from router.gating import top_k_gating

    d = MODEL["hidden_size"]
    x = torch.randn(tokens, d)
    gating = top_k_gating(torch.randn(tokens, MODEL["num_local_experts"]), 2)
    row = {}
    for name, pool in {"in_process": local, **pools}.items():
        slots, _ = pool.assign(0, gating)
        dispatch = group_by_slot(slots, pool.num_slots(0))
        xs = x[dispatch.token_idx]
        pool.start(0, xs, dispatch).result()  # warm
        row[name] = statistics.median(
            seconds(lambda p=pool, xs=xs, ds=dispatch: p.start(0, xs, ds).result())
            for _ in range(rounds)
        )
    out = {f"{k}_ms": round(v * 1e3, 3) for k, v in row.items()}
    for name in pools:
        out[f"{name}_overhead_ms"] = round((row[name] - row["in_process"]) * 1e3, 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--shards", type=int, default=2)
    args = parser.parse_args()

    import ray

    from serving import load_model

    ray.init(
        address="local",
        num_cpus=max(4, args.shards + 2),
        include_dashboard=False,
        log_to_driver=False,
    )
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(Path(tmp), MODEL)
        local = load_model(tmp)
        sharded = load_model(tmp, expert_shards=args.shards)
        plain = load_model(tmp, expert_shards=args.shards, transport="plain")

    ids = torch.randint(0, MODEL["vocab_size"], (args.batch, args.seq))
    assert (sharded(ids) - local(ids)).abs().max().item() < 1e-4  # same model, same answer
    times: dict[str, list[float]] = {"expert_shards_0": [], f"expert_shards_{args.shards}": []}
    for _ in range(args.rounds):  # interleaved, so noise hits both alike
        times["expert_shards_0"].append(seconds(lambda: local(ids)))
        times[f"expert_shards_{args.shards}"].append(seconds(lambda: sharded(ids)))
    tokens = args.batch * args.seq
    forward = {k: {"ms": round(statistics.median(v) * 1e3, 1),
                   "tokens_per_ms": round(tokens / (statistics.median(v) * 1e3), 3)}
               for k, v in times.items()}  # fmt: skip
    forward["ratio_sharded_over_local"] = round(
        statistics.median(times["expert_shards_0"])
        / statistics.median(times[f"expert_shards_{args.shards}"]),
        3,
    )
    pools = {"compiled_graph": sharded.pool, "plain_calls": plain.pool}
    sharded.pool.compiled_max_bytes = 1 << 40  # measure the graph at every size, past the cutoff
    assert sharded.pool.transport_in_use == "compiled" and plain.pool.transport_in_use == "plain"
    transport = {
        str(t): transport_overhead(local.pool, pools, t, max(args.rounds, 7))
        for t in (32, 512, 2048)
    }
    report = {
        "model": MODEL,
        "shards": args.shards,
        "prefill_tokens": tokens,
        "threads": torch.get_num_threads(),
        "forward": forward,
        "transport_per_layer_by_tokens": transport,
    }
    print(json.dumps(report, indent=2))
    sharded.close()
    plain.close()


if __name__ == "__main__":
    main()
