"""Two micro-batches in flight against one batch, with the experts on ExpertShards, in one run.

    .venv/bin/python scripts/bench_microbatch.py [--model DIR] [--shards 2] [--split 8]
        [--num-prompts 48] [--concurrency 16] [--input-len 128] [--output-len 64] [--rounds 2]

The scheduler in this process (no HTTP) serves `--num-prompts` random prompts, `--concurrency` at
a time, first as one batch per step (micro_batch_min_tokens 0), then as two micro-batches for
steps of at least `--split` tokens, alternating for `--rounds` rounds after a warm-up. Prints one
JSON line per run: output tokens/ms and the step accounting's fractions (serving/control/
steptime.py), where `overlapped` is the engine compute the second micro-batch hid.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serving import load_model  # noqa: E402
from serving.cli.bench import random_prompts  # noqa: E402
from serving.config import SchedulerConfig  # noqa: E402
from serving.control.steptime import StepAccounting  # noqa: E402
from serving.engine.demo import demo_checkpoint  # noqa: E402
from serving.engine.sampling import SamplingParams  # noqa: E402
from serving.engine.scheduler import Scheduler  # noqa: E402


async def run(model, prompts: list, args: argparse.Namespace, split: int) -> dict:
    model.split_min_tokens = split
    accounting = StepAccounting(window_s=1e9)
    scheduler = Scheduler(model, SchedulerConfig(max_batch_slots=args.concurrency))
    scheduler.observer = lambda r: accounting.record(
        r.interval_s, r.forward_s, r.expert, r.decode_rows, r.prefill_tokens, r.prefill_chunks
    )
    limit = asyncio.Semaphore(args.concurrency)

    async def one(prompt: list[int]) -> None:
        async with limit:
            seq = scheduler.submit(prompt, SamplingParams(max_tokens=args.output_len))
            async for _ in scheduler.stream(seq):
                pass

    start = time.perf_counter()
    await asyncio.gather(*(one(p) for p in prompts))
    wall = time.perf_counter() - start
    fractions = accounting.totals.fractions() or {}
    return {
        "micro_batch_min_tokens": split,
        "tokens_per_ms": round(len(prompts) * args.output_len / wall / 1000, 4),
        "fractions": {k: round(v, 3) for k, v in fractions.items()},
    }


async def main(args: argparse.Namespace) -> None:
    model = load_model(args.model or demo_checkpoint(), expert_shards=args.shards)
    try:
        vocab = model.config.vocab_size
        prompts = random_prompts(args.num_prompts, args.input_len, vocab, 0)
        await run(model, prompts, args, 0)  # warm-up
        for _ in range(args.rounds):
            for split in (0, args.split):
                print(json.dumps(await run(model, prompts, args, split)), flush=True)
    finally:
        model.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="checkpoint directory (default: the demo model)")
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--split", type=int, default=8, help="micro_batch_min_tokens to compare")
    ap.add_argument("--num-prompts", type=int, default=48)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the engine's: 1)")
    cli = ap.parse_args()
    torch.set_num_threads(cli.threads)
    asyncio.run(main(cli))
