"""ExpertShard as a plain class: versions, lazy reads, compute equal to the local experts."""

from __future__ import annotations

import numpy as np
import torch

from experts.checkpoint import Checkpoint
from experts.ffn import ExpertWeights, grouped_swiglu
from experts.shard import ExpertShard, from_numpy, to_numpy


def test_numpy_transport_round_trips_bfloat16():
    x = torch.randn(5, 7).to(torch.bfloat16)
    a = to_numpy(x)
    assert a.dtype == np.int16
    assert torch.equal(from_numpy(a, torch.bfloat16), x)


def test_prepare_compute_and_reuse(demo_path):
    shard = ExpertShard(str(demo_path))
    # layer 0 holds experts 3 and 5 (in that slot order); layer 1 holds 0; others none
    plan = [[3, 5], [0], [], []]
    assert shard.prepare(0, plan) == 3
    ckpt = Checkpoint(demo_path)
    ref = ExpertWeights.stack([ckpt.expert(0, e, torch.float32) for e in (3, 5)])
    x = torch.randn(9, 128)
    counts = np.array([4, 5])
    out, seconds = shard.compute(0, 0, to_numpy(x), counts)
    y = from_numpy(out, torch.float32)
    assert 0 < seconds < 10  # the shard's own compute time, for the step accounting
    assert torch.allclose(y, grouped_swiglu(x, torch.tensor(counts), ref), atol=1e-6)
    assert shard.token_counts(0) == [[4, 5], [0], [], []]
    # version 1 keeps expert 5 of layer 0 and adds 7: only expert 7 is read from disk
    assert shard.prepare(1, [[5, 7], [0], [], []]) == 1
    assert shard.versions() == [0, 1]
    shard.free(0)
    assert shard.versions() == [1]
    y1 = from_numpy(shard.compute(1, 0, to_numpy(x[4:]), np.array([5, 0]))[0], torch.float32)
    assert torch.allclose(y1, y[4:], atol=1e-6)  # expert 5's rows, now in local slot 0
