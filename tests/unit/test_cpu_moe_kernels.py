"""The MoE layer's C++ steps (experts/cpu_moe_source.py) against their definitions in router/:
the same experts, the same pairs in the same order, the same bits after the combine."""

from __future__ import annotations

import platform

import pytest
import torch

from experts import cpu_kernels
from experts.ffn import ExpertWeights
from experts.gemm import Linear
from experts.pool import LocalExpertPool
from router.dispatch import combine, group_by_slot
from router.gating import top_k_gating
from serving.engine.moe_layer import moe_layer

pytestmark = pytest.mark.skipif(
    platform.machine() not in ("x86_64", "AMD64"), reason="the CPU kernels are x86 (AVX2/AVX-512)"
)


@pytest.mark.parametrize(
    ("tokens", "experts", "k"), [(1, 8, 2), (37, 8, 2), (16, 16, 3), (5, 4, 4)]
)
def test_gating_picks_routers_experts_with_its_weights(tokens, experts, k):
    g = torch.Generator().manual_seed(tokens * experts + k)
    logits = torch.randn(tokens, experts, generator=g) * 3
    weights, chosen, probs = cpu_kernels.top_k_gating(logits, k)
    want = top_k_gating(logits, k)
    assert torch.equal(chosen, want.experts)
    torch.testing.assert_close(probs, want.probs, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(weights, want.weights, rtol=1e-6, atol=1e-7)
    assert weights.dtype == probs.dtype == torch.float32 and chosen.dtype == torch.int64


def test_gating_breaks_ties_where_torch_topk_does():
    # torch.topk (and transformers with it) sends ties to no fixed side: on this row of equals
    # it picks the last two. The same experts, whatever it does.
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0], [0.0, 0.0, 0.0, 5.0]])
    _, chosen, _ = cpu_kernels.top_k_gating(logits, 2)
    assert chosen.tolist() == top_k_gating(logits, 2).experts.tolist()


@pytest.mark.parametrize("drop", [0.0, 0.3])
def test_grouping_is_routers_stable_sort_with_drops(drop):
    g = torch.Generator().manual_seed(int(drop * 10))
    slots = torch.randint(0, 11, (29, 2), generator=g)
    slots[torch.rand(29, 2, generator=g) < drop] = -1
    pair_idx, token_idx, counts = cpu_kernels.group_by_slot(slots, 11)
    want = group_by_slot(slots, 11)
    assert torch.equal(pair_idx, want.pair_idx)
    assert torch.equal(token_idx, want.token_idx)
    assert torch.equal(counts, want.counts)


def test_grouping_refuses_a_slot_beyond_the_count():
    with pytest.raises(RuntimeError, match="beyond num_slots"):
        cpu_kernels.group_by_slot(torch.tensor([[0, 5]]), 4)


@pytest.mark.parametrize(("k", "hidden", "drop"), [(2, 512, 0.0), (2, 37, 0.25), (3, 100, 0.1)])
def test_combine_with_the_residual_is_bit_for_bit_routers(k, hidden, drop):
    g = torch.Generator().manual_seed(k * hidden)
    tokens, slots_n = 21, 6
    slots = torch.randint(0, slots_n, (tokens, k), generator=g)
    slots[torch.rand(tokens, k, generator=g) < drop] = -1
    dispatch = group_by_slot(slots, slots_n)
    weights = torch.softmax(torch.randn(tokens, k, generator=g), -1)
    y = torch.randn(dispatch.pair_idx.numel(), hidden, generator=g)
    h = torch.randn(tokens, hidden, generator=g)
    got = cpu_kernels.combine_add(h, y, dispatch.pair_idx, weights)
    assert torch.equal(got, h + combine(y, dispatch, weights))


def test_moe_layer_through_the_kernels_equals_routers_path():
    # The engine's MoE layer (C++ gating, grouping and combine) against the same layer with the
    # kernels out of the way (bfloat16-free: only the path differs).
    g = torch.Generator().manual_seed(3)
    d, f, e = 64, 96, 8
    weights = ExpertWeights.stack(
        [
            tuple(torch.randn(*s, generator=g) / 8 for s in ((f, d), (f, d), (d, f)))
            for _ in range(e)
        ]
    )
    pool, gate = LocalExpertPool([weights]), Linear(torch.randn(e, d, generator=g))
    x, h = torch.randn(19, d, generator=g), torch.randn(19, d, generator=g)
    got = moe_layer(x, gate, pool, 0, top_k=2, residual=h)
    gating = top_k_gating(gate(x), 2)
    dispatch = group_by_slot(gating.experts, e)
    y = pool.start(0, x[dispatch.token_idx], dispatch).result()
    torch.testing.assert_close(got, h + combine(y, dispatch, gating.weights), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(moe_layer(x, gate, pool, 0, top_k=2), got - h, rtol=1e-5, atol=1e-5)
