"""Decode steps replayed as CUDA graphs (serving/engine/cuda_graphs.py): a replay computes what
the eager step computes, the graphs follow the ordinary decode path step after step, and the
engine uses them and gives the tokens it gives without them."""

from __future__ import annotations

import asyncio

import pytest
import torch

from serving import load_model
from serving.config import SchedulerConfig
from serving.engine.cuda_graphs import DecodeGraphs, EagerSteps, key_bucket
from serving.engine.sampling import SamplingParams
from serving.engine.scheduler import Scheduler
from serving.engine.step_batch import step_batch

DEVICE = "cuda:0"
BF16_REL = 1e-2  # of the logits' largest magnitude: bf16 keeps 8 significant bits


@pytest.fixture(scope="module")
def model(demo_path):
    return load_model(demo_path, dtype=torch.bfloat16, device=DEVICE)


def _prefilled(model, lengths: list[int], max_len: int = 160):
    """A cache whose slot i holds a prompt of lengths[i] tokens; the prompts' next tokens."""
    cache = model.new_cache(len(lengths), max_len)
    gen = torch.Generator().manual_seed(1)
    nxt = []
    for slot, n in enumerate(lengths):
        prompt = torch.randint(3, 500, (1, n), generator=gen).to(DEVICE)
        logits = model(prompt, cache=cache, start_pos=0, slots=torch.tensor([slot]), last_only=True)
        nxt.append(int(logits[0, -1].argmax()))
    return cache, nxt


def test_a_replay_is_the_eager_step(model):
    cache, nxt = _prefilled(model, [5, 9, 12, 7])
    graphs = DecodeGraphs(model, cache, 4)
    rows = zip(nxt, [5, 9, 12, 7], strict=True)
    batch = step_batch([(t, slot, n) for slot, (t, n) in enumerate(rows)], [], DEVICE)
    got = graphs.step(batch)  # captured (its warm-up ran the step), then replayed
    again = graphs.step(batch)  # replayed alone: the same writes, the same reads
    length = key_bucket(batch.decode_keys, cache.max_len)
    eager = model.step(graphs.static_batch(4, length), cache)  # the recorded step, run eagerly
    assert list(graphs.graphs) == [(4, length)]
    assert torch.equal(got, again) and torch.equal(got, eager)


def test_graphs_follow_the_ordinary_decode_path(model):
    # Teacher-forced: both paths get the eager path's greedy tokens; rows cross the 64-key bucket.
    lengths = [50, 58, 61]
    eager_cache, nxt = _prefilled(model, lengths)
    graph_cache, _ = _prefilled(model, lengths)
    graphs = DecodeGraphs(model, graph_cache, 3)
    positions = list(lengths)
    for _ in range(8):
        rows = enumerate(zip(nxt, positions, strict=True))
        batch = step_batch([(t, s, p) for s, (t, p) in rows], [], DEVICE)
        want = model.step(batch, eager_cache).float()  # [D, V]
        got = graphs.step(batch).float()
        assert (got - want).abs().max() <= BF16_REL * want.abs().max()
        nxt = want.argmax(-1).tolist()
        positions = [p + 1 for p in positions]
    assert sorted(graphs.graphs) == [(3, 64), (3, 128)]


def test_the_engine_replays_graphs_and_keeps_its_tokens(model):
    # Prompts of different lengths, admitted together: the rows decode at different positions
    # in every step, so the eager path masks too and both paths run the same attention kernel.
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 500, (5 + 3 * i,), generator=gen).tolist() for i in range(4)]
    greedy = SamplingParams(max_tokens=12)

    async def run(graphs_on: bool):
        config = SchedulerConfig(max_batch_slots=4, step_token_budget=64, cuda_graphs=graphs_on)
        s = Scheduler(model, config)
        seqs = [s.submit(p, greedy) for p in prompts]

        async def tokens(seq):
            return [e.token async for e in s.stream(seq)]

        return s, await asyncio.gather(*(tokens(q) for q in seqs))

    graphed, with_graphs = asyncio.run(run(True))
    eager, without = asyncio.run(run(False))
    assert isinstance(eager.forward, EagerSteps) and isinstance(graphed.forward, DecodeGraphs)
    assert graphed.forward.graphs  # captured and replayed
    assert with_graphs == without
    assert all(len(t) == 12 for t in with_graphs)
