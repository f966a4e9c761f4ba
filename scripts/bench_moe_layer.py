"""One top-2 MoE layer on one GPU: moe-serve's vs transformers' vs a dense GEMM chain of equal FLOPs.

Prints one JSON line per case. For each layer shape and token count, on the same routed batch:
  ours:        serving.runner.moe_layer over a LocalExpertPool (grouped GEMM where available)
  eager, grouped_mm: transformers' MixtralSparseMoeBlock with that experts implementation
  dense:       x [T, D] @ [D, 2F] -> SwiGLU -> @ [F, D] repeated top_k times: the same FLOPs
               with no routing, the practical ceiling for the layer's arithmetic
and, at every size, the HBM bound: all expert weights read once at the measured device copy
bandwidth (--hbm-tb-s, default 4.3 TB/s: assumed, not measured), the floor for small batches.

Usage: python scripts/bench_moe_layer.py            (CUDA, bf16: the issue's shapes)
       python scripts/bench_moe_layer.py --tiny     (CPU fp32 smoke run of the same code)
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

SHAPES = {  # name: (hidden D, ffn F, experts E, top-k)
    "mixtral-8x7b-layer": (4096, 14336, 8, 2),
    "seed-like-layer": (3072, 8192, 16, 2),
}
TOKENS = [64, 1024, 8192, 32768]


def timed_ms(fn, iters: int, device: str) -> float:
    for _ in range(2):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / iters
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t) * 1e3 / iters


def build(shape: tuple[int, int, int, int], device: str, dtype: torch.dtype):
    """transformers' block with N(0, 0.02) weights, and our pool over the very same tensors."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    from experts.ffn import ExpertWeights
    from experts.pool import LocalExpertPool

    d, f, e, k = shape
    cfg = MixtralConfig(
        hidden_size=d, intermediate_size=f, num_local_experts=e, num_experts_per_tok=k
    )
    block = MixtralSparseMoeBlock(cfg).to(device=device, dtype=dtype).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.02)
    cfg._experts_implementation = "eager"
    block.experts.config = cfg  # the block dispatches on this attribute; the cases below set it
    experts = block.experts  # gate_up_proj [E, 2F, D], down_proj [E, D, F]: our stacked layout
    pool = LocalExpertPool([ExpertWeights(experts.gate_up_proj.data, experts.down_proj.data)])
    return cfg, block, pool


def run_case(
    name: str, shape, tokens: int, device: str, dtype, hbm_tb_s: float, iters: int
) -> dict:
    from experts.gemm import Linear
    from serving.engine.moe_layer import moe_layer

    d, f, e, k = shape
    cfg, block, pool = build(shape, device, dtype)
    x = torch.randn(tokens, d, device=device, dtype=dtype)
    gate = Linear(block.gate.weight.data)
    w13 = torch.randn(2 * f, d, device=device, dtype=dtype) * 0.02
    w2 = torch.randn(d, f, device=device, dtype=dtype) * 0.02

    def dense():
        for _ in range(k):
            g, u = F.linear(x, w13).chunk(2, dim=-1)
            F.linear(F.silu(g) * u, w2)

    with torch.inference_mode():
        ours_out = moe_layer(x, gate, pool, 0, k)
        ref_out = block(x[None])[0]
        err = (ours_out.float() - ref_out.float()).abs().max().item()
        row = {"case": name, "tokens": tokens, "max_abs_diff_vs_transformers": err}
        row["ours_ms"] = timed_ms(lambda: moe_layer(x, gate, pool, 0, k), iters, device)
        for impl in ("eager", "grouped_mm"):
            cfg._experts_implementation = impl
            block.experts.config = cfg
            row[f"{impl}_ms"] = timed_ms(lambda: block(x[None]), iters, device)
        row["dense_ms"] = timed_ms(dense, iters, device)
    flop = 2 * tokens * k * 3 * d * f
    weight_bytes = e * 3 * d * f * torch.finfo(dtype).bits // 8
    row["gflop"] = round(flop / 1e9, 2)
    for key in ("ours", "eager", "grouped_mm", "dense"):
        row[f"{key}_tflops"] = flop / row[f"{key}_ms"] / 1e9
    row["hbm_bound_ms"] = weight_bytes / (hbm_tb_s * 1e12) * 1e3
    row["ours_over_hbm_bound"] = round(row["ours_ms"] / row["hbm_bound_ms"], 2)
    row["grouped_mm_over_hbm_bound"] = round(row["grouped_mm_ms"] / row["hbm_bound_ms"], 2)
    row["ours_over_dense"] = round(row["dense_ms"] / row["ours_ms"], 3)
    return {k2: (round(v, 4) if isinstance(v, float) else v) for k2, v in row.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU fp32 smoke run on a tiny shape")
    parser.add_argument("--hbm-tb-s", type=float, default=4.3)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
    device, dtype = ("cpu", torch.float32) if args.tiny else ("cuda", torch.bfloat16)
    shapes = {"tiny": (64, 128, 8, 2)} if args.tiny else SHAPES
    tokens = [16, 128] if args.tiny else TOKENS
    torch.manual_seed(0)
    for name, shape in shapes.items():
        for t in tokens:
            print(
                json.dumps(run_case(name, shape, t, device, dtype, args.hbm_tb_s, args.iters)),
                flush=True,
            )


if __name__ == "__main__":
    main()
