"""Which way to call the CPU's GEMM for the model's weights, at the row counts serving sees.

    .venv/bin/python scripts/bench_gemm.py [--threads 1] [--rows 1,4,16,64,256] [--json]

For each weight shape of the engine-speed model (expert w13 and w2, attention qkv and output,
lm_head) and each row count, computes x [M, K] times a weight with N outputs in four ways:
  linear       F.linear(x, w), w [N, K] as checkpoints store it
  transposed   (w @ x.T).T, w [N, K]
  k_major      x @ w_t, w_t [K, N] contiguous (the weight transposed once at load)
  mkl_packed   torch.ops.mkl._mkl_linear with the weight packed once for MKL's sgemm at this row
               count (MKL falls back to its plain path at any other; the pack is 2.3x the weight)
  ours         experts/cpu_kernels.py: packed once at load, any row count (what serving uses)
Weights are cycled through a set larger than any cache (--working-set MB), as a decode step
streams them from memory; each way's rounds alternate with the others' so that a neighbour's load
weighs on all alike. Prints median ms per call and the bytes of weight streamed per second.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from experts import cpu_kernels  # noqa: E402

SHAPES = {  # name: (N outputs, K inputs)
    "expert_w13": (3072, 512),
    "expert_w2": (512, 1536),
    "qkv": (768, 512),
    "lm_head": (32000, 512),
}


def mkl_available() -> bool:
    try:
        w = torch.randn(8, 8)
        torch.ops.mkl._mkl_linear(
            torch.randn(2, 8), torch.ops.mkl._mkl_reorder_linear_weight(w, 2), w, None, 2
        )
        return True
    except (RuntimeError, AttributeError):
        return False


def ways(weights: list[torch.Tensor], rows: int, mkl: bool) -> dict:
    """name -> a function of (x, i) computing x times weight i."""
    t = [w.t().contiguous() for w in weights]
    out = {
        "linear": lambda x, i: F.linear(x, weights[i]),
        "transposed": lambda x, i: (weights[i] @ x.t()).t(),
        "k_major": lambda x, i: x @ t[i],
    }
    if cpu_kernels.available():
        ours = [cpu_kernels.pack(w) for w in weights]
        out["ours"] = lambda x, i: cpu_kernels.mm(x, ours[i], weights[i].shape[0])
    if mkl:
        packed = [torch.ops.mkl._mkl_reorder_linear_weight(w, rows) for w in weights]
        out["mkl_packed"] = lambda x, i: torch.ops.mkl._mkl_linear(
            x, packed[i], weights[i], None, rows
        )
    return out


def measure(shape: tuple[int, int], rows: int, working_set_mb: int, rounds: int, mkl: bool):
    n, k = shape
    count = max(2, working_set_mb * 2**20 // (4 * n * k))
    weights = [torch.randn(n, k) * 0.02 for _ in range(count)]
    x = torch.randn(rows, k)
    fns = ways(weights, rows, mkl)
    ref = fns["linear"](x, 0)
    for name, fn in fns.items():
        assert (fn(x, 0) - ref).abs().max().item() < 1e-3, name
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for i in range(count):
                fn(x, i)
            times[name].append((time.perf_counter() - start) / count)
    nbytes = 4 * n * k
    return {name: {"ms": round(statistics.median(v) * 1e3, 4),
                   "gb_s": round(nbytes / statistics.median(v) / 1e9, 2)}
            for name, v in times.items()}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", default="1,4,8,16,32,64,128,256")
    ap.add_argument("--working-set", type=int, default=256, help="MB of weights cycled through")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    mkl = mkl_available()
    results = {}
    for name, shape in SHAPES.items():
        for rows in (int(r) for r in args.rows.split(",")):
            results[f"{name} M={rows}"] = measure(shape, rows, args.working_set, args.rounds, mkl)
    if args.json:
        print(json.dumps({"threads": args.threads, "results": results}, indent=2))
        return
    names = list(next(iter(results.values())))
    print(f"{'shape':<20}" + "".join(f"{n:>22}" for n in names) + "   (ms per call, GB/s)")
    for key, r in results.items():
        print(f"{key:<20}" + "".join(f"{r[n]['ms']:>12.3f} {r[n]['gb_s']:>7.1f}  " for n in names))


if __name__ == "__main__":
    main()
