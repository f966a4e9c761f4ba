"""The engine's throughput with decode steps as CUDA graphs and without, side by side in one run.

    python scripts/bench_engine.py [--model DIR | --shape seed-2l] [--device cuda:0]
        [--dtype bfloat16|float32] [--batch 16] [--num-prompts 48] [--input-len 128] [--output-len 64]
        [--rounds 3]

The scheduler in this process (no HTTP: what the Engine deployment runs) serves `--num-prompts`
random prompts, all submitted at once, `--batch` at a time (ignore EOS, greedy): continuous
batching, prefill chunks and decode steps as in serving. Two schedulers over the same model, one
with `cuda_graphs` on and one off, each warmed up once (graphs are captured then), then timed in
alternating order for `--rounds` rounds. Prints one JSON object: output tokens/ms per round and
their medians, and graphed / eager. Where the model cannot be graphed (a CPU, experts on shards,
fp32) it says why and times the eager engine alone. The model: --model, else `--shape seed-2l`
(scripts/bench_forward.py's 2-layer seed-like model, written with random weights), else the
built-in demo model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_forward import SHAPES, write_checkpoint  # noqa: E402

from serving import load_model  # noqa: E402
from serving.cli.bench import random_prompts  # noqa: E402
from serving.config import SchedulerConfig  # noqa: E402
from serving.engine import cuda_graphs  # noqa: E402
from serving.engine.demo import demo_checkpoint  # noqa: E402
from serving.engine.sampling import SamplingParams  # noqa: E402
from serving.engine.scheduler import Scheduler  # noqa: E402


async def serve_all(s: Scheduler, prompts: list[list[int]], output_len: int) -> float:
    """Every prompt at once through the scheduler; output tokens/ms until the last token."""
    params = SamplingParams(max_tokens=output_len)  # no stop tokens: every request full length

    async def count(seq) -> int:
        return sum([1 async for _ in s.stream(seq)])

    start = time.perf_counter()
    seqs = [s.submit(p, params) for p in prompts]
    tokens = sum(await asyncio.gather(*(count(q) for q in seqs)))
    return tokens / (time.perf_counter() - start) / 1e3


async def measure(engines: dict[str, Scheduler], prompts, output_len: int, rounds: int) -> dict:
    """Each engine warmed up once (graphs are captured then), then `rounds` alternating rounds,
    all in one event loop (a scheduler lives in the loop that first ran it)."""
    for s in engines.values():
        await serve_all(s, prompts, output_len)
    modes = list(engines)
    rates: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(rounds):
        for m in modes if r % 2 == 0 else modes[::-1]:
            rates[m].append(round(await serve_all(engines[m], prompts, output_len), 3))
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="checkpoint directory (default: the demo model)")
    ap.add_argument("--shape", choices=["seed-2l"], help="a random-weight model of this shape")
    ap.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"],
                    help="default: bfloat16 on CUDA, float32 on a CPU (where the engine's kernels "
                    "are float32 and bfloat16 falls back to torch's slower GEMM)")  # fmt: skip
    ap.add_argument("--batch", type=int, default=16, help="KV slots = concurrent requests")
    ap.add_argument("--num-prompts", type=int, default=48)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    dtype = getattr(
        torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or demo_checkpoint()
        if args.shape and not args.model:
            write_checkpoint(Path(tmp), SHAPES[args.shape], dtype)
            path = tmp
        model = load_model(path, dtype=dtype, device=args.device)
    prompts = random_prompts(args.num_prompts, args.input_len, model.config.vocab_size, 0)
    config = SchedulerConfig(max_batch_slots=args.batch, step_token_budget=max(512, args.batch),
                             max_seq_len=args.input_len + args.output_len + 8,
                             max_queue=args.num_prompts)  # fmt: skip
    why = cuda_graphs.unsupported(model)
    modes = ["eager"] if why else ["eager", "cuda_graphs"]
    engines = {m: Scheduler(model, config.model_copy(update={"cuda_graphs": m != "eager"}))
               for m in modes}  # fmt: skip
    rates = asyncio.run(measure(engines, prompts, args.output_len, args.rounds))
    report = {
        "command": " ".join(["scripts/bench_engine.py", *sys.argv[1:]]),
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name(0)
            if model.device.type == "cuda"
            else platform.processor(),
        },  # fmt: skip
        "tokens_per_ms": {
            m: {"median": statistics.median(v), "rounds": v} for m, v in rates.items()
        },
    }
    if why:
        report["cuda_graphs"] = f"not used: {why}"
    else:
        report["graphs_over_eager"] = round(
            statistics.median(rates["cuda_graphs"]) / statistics.median(rates["eager"]), 3
        )
        report["graphs_captured"] = len(engines["cuda_graphs"].forward.graphs)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
