"""Forward-pass speed of moe-serve's model core against transformers' Mixtral, side by side.

Prints one JSON object. Both implementations load the same checkpoint (written by transformers'
save_pretrained), run in the same process, and are timed in interleaved rounds so that machine
noise hits them alike; each figure is the median over rounds.

  prefill: batch 4 x 512 tokens, full logits (what both compute by default)
  decode:  one step at batch 32 after a 256-token prompt in the KV cache, beside its floor: the
           weights such a step reads (every expert is touched at batch 32) at the device's copy
           rate measured in the same run

Usage: python scripts/bench_forward.py [--rounds 5] [--dtype float32] [--device cpu] [--small]
                                       [--shape demo|seed-2l]
  --shape seed-2l: the seed-like layer (hidden 3072, FFN 8192, 16 experts, 24/8 heads) in a 2-layer
  model, for a GPU: ~5 GB of weights in bf16, so the step is no longer launch-bound.
"""

from __future__ import annotations

import argparse
import inspect
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

MODEL = dict(
    vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
    num_attention_heads=8, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
    max_position_embeddings=1024,
)  # fmt: skip
SHAPES = {
    "demo": MODEL,
    "seed-2l": dict(MODEL, hidden_size=3072, intermediate_size=8192, num_hidden_layers=2,
                    num_attention_heads=24, num_key_value_heads=8, num_local_experts=16),
}  # fmt: skip


def write_checkpoint(path: Path, config: dict, dtype: torch.dtype = torch.float32) -> None:
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    MixtralForCausalLM(MixtralConfig(**config)).to(dtype).save_pretrained(path)


def gemm_peak(device: str, dtype: torch.dtype, n: int = 2048, rounds: int = 7) -> float:
    """Median FLOP/s of one n x n x n matmul: the machine's practical GEMM peak."""
    a, b = (
        torch.randn(n, n, device=device, dtype=dtype),
        torch.randn(n, n, device=device, dtype=dtype),
    )
    return 2 * n**3 / median_seconds(lambda: a @ b, rounds, device)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_seconds(fn, rounds: int, device: str) -> float:
    fn()
    times = []
    for _ in range(rounds):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bytes_per_s(device: str, nbytes: int = 1 << 30, rounds: int = 5) -> float:
    """Median bytes moved per second (read + write) by one large device copy."""
    src = torch.empty(nbytes // 4, device=device, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    return 2 * nbytes / median_seconds(lambda: dst.copy_(src), rounds, device)


def decode_weight_bytes(c: dict, itemsize: int) -> int:
    """Bytes of weights one decode step reads when every expert is touched (the embedding only
    gathers rows, so it is left out; lm_head, attention, norms and gates are in)."""
    d, f, h = c["hidden_size"], c["intermediate_size"], c["num_attention_heads"]
    kv = c["num_key_value_heads"] * (d // h)
    per_layer = d * (d + 2 * kv) + d * d + c["num_local_experts"] * (d + 3 * d * f) + 2 * d
    return itemsize * (c["num_hidden_layers"] * per_layer + c["vocab_size"] * d + d)


def forward_flops(c: dict, tokens: int, context: float) -> float:
    """Model FLOPs of a forward pass: 2 x active weights per token, plus attention scores.

    context is the mean number of keys each query attends to.
    """
    d, f, h = c["hidden_size"], c["intermediate_size"], c["num_attention_heads"]
    dh = d // h
    kv = c["num_key_value_heads"] * dh
    per_layer = d * (d + 2 * kv) + d * d + c["num_local_experts"] * d  # qkv, o, router
    per_layer += c["num_experts_per_tok"] * 3 * d * f  # top-k SwiGLU experts
    weights = c["num_hidden_layers"] * per_layer + c["vocab_size"] * d  # + lm_head
    attention = c["num_hidden_layers"] * 2 * 2 * h * dh * context  # QK^T and AV
    return tokens * (2 * weights + attention)


def graphed_decode(model, cache, step_ids: torch.Tensor, start: int):
    """Our decode step replayed as a CUDA graph (the engine's path on a GPU), or None where the
    model cannot be graphed (serving/engine/cuda_graphs.py says why)."""
    from serving.engine import cuda_graphs
    from serving.engine.step_batch import rows_batch

    if cuda_graphs.unsupported(model) is not None:
        return None
    b = step_ids.shape[0]
    graphs = cuda_graphs.DecodeGraphs(model, cache, b)
    batch = rows_batch(step_ids, [start] * b, list(range(b)), last_only=True)
    return lambda: graphs.step(batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--small", action="store_true", help="a quick run on a smaller shape")
    parser.add_argument("--shape", default="demo", choices=sorted(SHAPES))
    args = parser.parse_args()

    from transformers import DynamicCache, MixtralForCausalLM

    # transformers renamed forward's past_key_values to cache; take whichever this version has.
    params = inspect.signature(MixtralForCausalLM.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"
    model_shape = SHAPES[args.shape]

    from serving import load_model

    dtype = getattr(torch, args.dtype)
    dev = args.device
    batch_p, seq_p, batch_d, ctx_d = (2, 128, 8, 64) if args.small else (4, 512, 32, 256)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(Path(tmp), model_shape, dtype)
        ours = load_model(tmp, dtype=dtype, device=dev)
        hf = {
            impl: MixtralForCausalLM.from_pretrained(tmp, dtype=dtype, experts_implementation=impl)
            .to(dev)
            .eval()
            for impl in ("eager", "grouped_mm")
        }

    prefill_ids = torch.randint(0, model_shape["vocab_size"], (batch_p, seq_p), device=dev)
    prompt = torch.randint(0, model_shape["vocab_size"], (batch_d, ctx_d), device=dev)
    step_ids = torch.randint(0, model_shape["vocab_size"], (batch_d, 1), device=dev)

    # Decode state: each implementation's cache holds the same 256-token prompt.
    cache = ours.new_cache(batch_d, ctx_d + 1)
    ours(prompt, cache=cache, start_pos=0, last_only=True)
    hf_caches = {}
    with torch.inference_mode():
        for impl, model in hf.items():
            hf_caches[impl] = DynamicCache(config=model.config)
            model(prompt, **{cache_kw: hf_caches[impl]}, use_cache=True, logits_to_keep=1)

    def hf_step(impl: str):
        model, c = hf[impl], hf_caches[impl]
        with torch.inference_mode():
            model(step_ids, **{cache_kw: c}, use_cache=True, logits_to_keep=1)
        c.crop(-1)  # back to the prompt, so every round measures the same step

    def hf_prefill(impl: str):
        with torch.inference_mode():
            hf[impl](prefill_ids, use_cache=False)

    graphed = graphed_decode(ours, cache, step_ids, ctx_d)
    cases = {
        "prefill": {
            "ours": lambda: ours(prefill_ids),
            **{f"transformers_{i}": (lambda i=i: hf_prefill(i)) for i in hf},
        },
        "decode": {
            "ours": lambda: ours(step_ids, cache=cache, start_pos=ctx_d, last_only=True),
            **({"ours_cuda_graphs": graphed} if graphed else {}),
            **{f"transformers_{i}": (lambda i=i: hf_step(i)) for i in hf},
        },
    }
    times: dict[str, dict[str, list[float]]] = {k: {n: [] for n in v} for k, v in cases.items()}
    for _ in range(args.rounds):  # interleaved: every implementation once per round
        for kind, fns in cases.items():
            for name, fn in fns.items():
                times[kind][name].append(median_seconds(fn, 1, dev))

    peak = gemm_peak(dev, dtype)
    copy_rate = copy_bytes_per_s(dev)
    floor_s = decode_weight_bytes(model_shape, dtype.itemsize) / copy_rate
    tokens = {"prefill": batch_p * seq_p, "decode": batch_d}
    flops = {
        "prefill": forward_flops(model_shape, batch_p * seq_p, (seq_p + 1) / 2),
        "decode": forward_flops(model_shape, batch_d, ctx_d + 1),
    }
    report: dict = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "threads": torch.get_num_threads(), "device": dev, "dtype": args.dtype,
                    "torch": torch.__version__},
        "model": model_shape,
        "gemm_peak_gflops": round(peak / 1e9, 1),
        "copy_gb_s": round(copy_rate / 1e9, 1),
        "rounds": args.rounds,
    }  # fmt: skip
    for kind in cases:
        rows = {}
        for name, ts in times[kind].items():
            s = statistics.median(ts)
            rows[name] = {
                "ms": round(s * 1e3, 2),
                "tokens_per_ms": round(tokens[kind] / (s * 1e3), 3),
                "fraction_of_gemm_peak": round(flops[kind] / s / peak, 3),
            }
        best_hf = min(statistics.median(times[kind][n]) for n in rows if not n.startswith("ours"))
        for ours_name in [n for n in rows if n.startswith("ours")]:
            key = "speedup_vs_best_transformers" + ours_name[len("ours") :]
            rows[key] = round(best_hf / statistics.median(times[kind][ours_name]), 3)
        report[kind] = {"shape": f"{batch_p}x{seq_p}" if kind == "prefill" else
                        f"batch {batch_d}, cache {ctx_d}", **rows}  # fmt: skip
    report["decode"]["weight_floor_ms"] = round(floor_s * 1e3, 3)
    for ours_name in [n for n in times["decode"] if n.startswith("ours")]:
        report["decode"][f"{ours_name}_over_floor"] = round(
            statistics.median(times["decode"][ours_name]) / floor_s, 2
        )
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
