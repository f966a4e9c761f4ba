"""The serving path on CUDA: continuous batching over a CUDA model (what `moe-serve up --device
cuda:0` runs) gives the tokens of in-process generation, greedy and seeded."""

from __future__ import annotations

import asyncio

import torch

from serving import load_model
from serving.config import SchedulerConfig
from serving.engine.generate import generate
from serving.engine.sampling import SamplingParams
from serving.engine.scheduler import Scheduler


def test_scheduler_on_cuda_matches_generate(demo_path, no_tf32, device="cuda:0"):
    model = load_model(demo_path, dtype=torch.float32, device=device)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 500, (5 + i,), generator=g).tolist() for i in range(6)]
    params = [
        SamplingParams(max_tokens=8, temperature=0.0 if i % 2 else 0.8, seed=i) for i in range(6)
    ]

    async def tokens(s: Scheduler, seq) -> list[int]:
        return [e.token async for e in s.stream(seq)]

    async def main():
        s = Scheduler(model, SchedulerConfig(max_batch_slots=4, step_token_budget=64))
        seqs = [s.submit(p, q) for p, q in zip(prompts, params, strict=True)]
        return await asyncio.gather(*(tokens(s, q) for q in seqs))

    outs = asyncio.run(main())
    for p, q, tokens in zip(prompts, params, outs, strict=True):
        assert tokens == list(generate(model, p, q))
