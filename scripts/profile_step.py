"""Where a decode step and a prefill chunk spend their time, beside the weight-streaming floor.

    .venv/bin/python scripts/profile_step.py [--batch 16] [--context 128] [--chunk 128]
        [--repeats 10] [--rounds 5] [--json]

Loads the engine-speed checkpoint (scripts/bench_peer.py writes it: Mixtral hidden 512, FFN 1536,
8 experts top-2, 4 layers, vocab 32000, fp32) in process on one thread (the engine's setting on 2
cores), fills a KV cache with `--batch` prompts of `--context` tokens, then profiles decode steps
(one new token per row, what the scheduler runs) and one `--chunk`-token prefill with
torch.profiler. Every operator's own time is attributed, by the Python function it ran under, to:
expert GEMMs, dense GEMMs (QKV, output projection, gate logits), lm_head, attention (SDPA, RoPE,
KV cache reads and writes), gating and dispatch (softmax, top-k, balancer, grouping, combine),
norms and activations, sampling, and the rest; the wall time outside operators is Python and
scheduling. Prints the table and the floor (bytes the step must read over the single-thread read
bandwidth measured in the same run; scripts/bench_peer.py `floor`), and the decode step over the
floor with both measured in turns, `--rounds` times (the median and each round); and the same
against the roofline floor, where each part of the step (experts, attention, gates, lm_head) costs
the longer of reading its weights and doing its arithmetic at one thread's GEMM peak, measured in
the same turns.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_peer  # noqa: E402  (the checkpoint and the floor: one definition)

from serving import load_model  # noqa: E402
from serving.engine.sampling import SamplingParams, sample  # noqa: E402

# (function name in the Python stack -> category), innermost match wins, in this order.
CATEGORIES = [
    ("sample", "sampling"),
    ("_packed_swiglu", "expert GEMMs"),
    ("grouped_swiglu", "expert GEMMs"),
    ("compute", "expert GEMMs"),
    ("top_k_gating", "gating and dispatch"),
    ("_top_k_gating", "gating and dispatch"),
    ("_group_by_slot", "gating and dispatch"),
    ("result", "gating and dispatch"),  # MoeInFlight.result: the combine
    ("assign", "gating and dispatch"),
    ("group_by_slot", "gating and dispatch"),
    ("combine", "gating and dispatch"),
    ("moe_layer", "dense GEMMs (gate logits)"),
    ("rms_norm", "norms and activations"),
    ("apply_rope", "attention"),
    ("rope", "attention"),
    ("_decode", "attention"),
    ("_span", "attention"),
    ("attend", "attention"),
    ("_attention", "dense GEMMs (QKV, output)"),
    ("step", "lm_head and embedding"),
]


# Operators whose category their name tells, wherever they are called from.
BY_NAME = {"moe_serve::rope_": "attention"}


def category(event) -> str:
    """The category of an operator: its nearest enclosing function of ours (the profiler records
    Python frames as parent events named "path(line): function")."""
    if event.name in BY_NAME:
        return BY_NAME[event.name]
    parent = event.cpu_parent
    while parent is not None:
        name = parent.name
        if ": " in name and any(p in name for p in ("serving/", "experts/", "router/")):
            func = name.rsplit(": ", 1)[-1]
            for known, label in CATEGORIES:
                if func == known:
                    return label
        parent = parent.cpu_parent
    return "other operators"


def profiled(step, repeats: int) -> tuple[dict[str, float], float]:
    """Mean ms per call of each category's own operator time, and of the wall time."""
    step()  # warm up
    with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
        start = time.perf_counter()
        for _ in range(repeats):
            step()
        wall = (time.perf_counter() - start) / repeats * 1e3
    parts: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if event.name.startswith(("aten::", "mkl", "moe_serve")):
            parts[category(event)] += event.self_cpu_time_total / 1e3 / repeats
    parts["Python and scheduling (outside operators)"] = max(0.0, wall - sum(parts.values()))
    return dict(sorted(parts.items(), key=lambda kv: -kv[1])), wall


def timed(step, repeats: int) -> float:
    """Median ms of `step` without the profiler (its overhead inflates the profiled wall)."""
    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def step_over_floor(decode, batch: int, rounds: int, repeats: int) -> dict:
    """Decode steps and the single-thread read rate measured in turns, `rounds` times: each
    round's median step over the floor at that round's read rate. A shared machine's read rate
    moves between runs minutes apart (12.8-15.1 GB/s here), so a floor measured once, away from
    the steps, makes a noisy ratio."""
    total = sum(bench_peer.decode_bytes(batch).values())
    ratios, rates, roof, peaks = [], [], [], []
    for _ in range(rounds):
        step_ms = timed(decode, repeats)
        rate = bench_peer.bandwidth_gb_s(repeats=3)["read_gb_s"]
        peak = bench_peer.gemm_peak_gflops()
        ratios.append(round(step_ms / (total / rate / 1e6), 3))
        roof.append(round(step_ms / bench_peer.roofline_ms(batch, rate, peak)["total"], 3))
        rates.append(rate)
        peaks.append(peak)
    return {"median": statistics.median(ratios), "ratios": ratios, "read_gb_s": rates,
            "roofline_median": statistics.median(roof), "roofline_ratios": roof,
            "gemm_peak_gflops": peaks,
            "roofline_ms": bench_peer.roofline_ms(batch, statistics.median(rates),
                                                  statistics.median(peaks))}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5,
                    help="rounds of decode steps and the read rate measured in turns (the "
                    "step / floor ratio)")  # fmt: skip
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    bench_peer.OUT.mkdir(parents=True, exist_ok=True)
    model = load_model(bench_peer.write_checkpoint(bench_peer.OUT / "ckpt"))
    b, ctx, vocab = args.batch, args.context, model.config.vocab_size
    steps = args.repeats * (3 + args.rounds) + 4 + args.rounds
    cache = model.new_cache(b + 1, ctx + steps + args.chunk)
    model(torch.randint(3, vocab, (b, ctx)), cache=cache)  # the prompts, in the cache
    ids = torch.randint(3, vocab, (b, 1))
    greedy = SamplingParams(max_tokens=1)
    position = [ctx]

    def decode() -> None:
        logits = model(ids, cache=cache, start_pos=position[0], slots=torch.arange(b),
                       last_only=True)  # fmt: skip
        sample(logits[:, -1], greedy, None).tolist()  # one greedy pick for every row, as the engine
        position[0] += 1

    chunk = torch.randint(3, vocab, (1, args.chunk))

    def prefill() -> None:
        model(chunk, cache=cache, start_pos=0, slots=torch.tensor([b]), last_only=True)

    decode_parts, _ = profiled(decode, args.repeats)
    decode_ms = timed(decode, args.repeats)
    prefill_parts, _ = profiled(prefill, max(2, args.repeats // 3))
    prefill_ms = timed(prefill, max(2, args.repeats // 3))
    step_floor = bench_peer.floor(b)
    ratio = step_over_floor(decode, b, args.rounds, args.repeats)
    report = {
        "command": " ".join(["scripts/profile_step.py", *sys.argv[1:]]),
        "decode": {
            "batch": b,
            "context": ctx,
            "step_ms": round(decode_ms, 2),
            "profile_ms": {k: round(v, 2) for k, v in decode_parts.items()},
        },
        "prefill": {
            "tokens": args.chunk,
            "chunk_ms": round(prefill_ms, 2),
            "profile_ms": {k: round(v, 2) for k, v in prefill_parts.items()},
        },
        "floor": step_floor,
        "step_over_floor": ratio,
        "machine": bench_peer.machine(),
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    for name in ("decode", "prefill"):
        r = report[name]
        total = r.get("step_ms", r.get("chunk_ms"))
        print(f"{name}: {total} ms (median, unprofiled); profiled, ms per call:")
        for part, ms in r["profile_ms"].items():
            print(f"  {part:<45}{ms:8.2f}")
    f = report["floor"]
    print(f"floor of a decode step: {f['floor_ms']} ms ({f['bytes'] / 1e6:.0f} MB at "
          f"{f['read_gb_s']} GB/s read, one thread; {f['floor_ms_at_copy_rate']} ms at the "
          f"{f['copy_gb_s']} GB/s copy rate); {report['machine']}")  # fmt: skip
    print(f"decode step / floor, {args.rounds} rounds of steps and the read rate in turns: median "
          f"{ratio['median']} (rounds {ratio['ratios']}; read GB/s {ratio['read_gb_s']})")  # fmt: skip
    rf = ratio["roofline_ms"]
    print(f"roofline floor (each part: the longer of reading its weights and its arithmetic at "
          f"{statistics.median(ratio['gemm_peak_gflops'])} GFLOP/s, one thread's GEMM peak): "
          f"{rf['total']} ms {rf}; decode step / roofline floor: median "
          f"{ratio['roofline_median']} (rounds {ratio['roofline_ratios']})")  # fmt: skip


if __name__ == "__main__":
    main()
