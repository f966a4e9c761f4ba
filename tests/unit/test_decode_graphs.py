"""Decode steps as CUDA graphs (serving/engine/cuda_graphs.py), what a CPU can check: the key
buckets, the refusals with their reasons, and that the step a graph records (every row attending
to a bucket of keys under a position mask) computes what the ordinary step does. The capture and
replay themselves are checked on a GPU: tests/gpu/test_cuda_graphs.py."""

from __future__ import annotations

import pytest
import torch

from serving import load_model
from serving.config import SchedulerConfig
from serving.engine import cuda_graphs
from serving.engine.cuda_graphs import DecodeGraphs, EagerSteps, key_bucket
from serving.engine.scheduler import Scheduler
from serving.engine.step_batch import StepBatch, step_batch


@pytest.mark.parametrize(
    ("keys", "max_len", "bucket"),
    [(1, 2048, 64), (64, 2048, 64), (65, 2048, 128), (300, 2048, 512), (1500, 1024, 1024)],
)
def test_key_bucket(keys, max_len, bucket):
    assert key_bucket(keys, max_len) == bucket


def test_a_cpu_model_is_not_graphed_and_says_why(demo_path):
    model = load_model(demo_path)
    assert "not a CUDA device" in cuda_graphs.unsupported(model)
    with pytest.raises(ValueError, match="cannot be graphed: the model is on cpu"):
        DecodeGraphs(model, model.new_cache(2, 32), 2)
    scheduler = Scheduler(model, SchedulerConfig(max_batch_slots=2, step_token_budget=8))
    assert isinstance(scheduler.forward, EagerSteps)


def test_the_recorded_step_matches_the_ordinary_step(demo_path):
    # bf16 on a CPU takes the same attention path as a GPU (gather by slot, SDPA), not the C++
    # float32 kernel. Rows at different positions; the bucket reads keys past every row's end.
    model = load_model(demo_path, dtype=torch.bfloat16)
    cache = model.new_cache(3, 96)
    gen = torch.Generator().manual_seed(3)
    lengths = [5, 11, 8]
    for slot, n in enumerate(lengths):
        prompt = torch.randint(3, 500, (1, n), generator=gen)
        model(prompt, cache=cache, start_pos=0, slots=torch.tensor([slot]), last_only=True)
    decodes = [
        (int(t), slot, n) for slot, (t, n) in enumerate(zip([7, 9, 11], lengths, strict=True))
    ]
    batch = step_batch(decodes, [])
    want = model.step(batch, cache).float()  # [D, V]
    length = key_bucket(batch.decode_keys, cache.max_len)
    assert length == 64 > batch.decode_keys
    recorded = StepBatch(ids=batch.ids, positions=batch.positions, slots=batch.slots,
                         decodes=3, decode_keys=length, decode_ragged=True, spans=(),
                         logit_rows=torch.arange(3))  # fmt: skip
    got = model.step(recorded, cache).float()
    assert (got - want).abs().max() <= 1e-2 * want.abs().max()
    assert torch.equal(got.argmax(-1), want.argmax(-1))
