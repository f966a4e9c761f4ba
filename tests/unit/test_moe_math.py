"""Gating, dispatch, grouped expert compute and the MoE layer against slow, obvious references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from experts import cpu_kernels
from experts.ffn import (
    ExpertWeights,
    _loop_swiglu,
    expert_forward,
    grouped_mm_supported,
    grouped_swiglu,
)
from experts.gemm import Linear
from experts.pool import LocalExpertPool
from router.dispatch import combine, group_by_slot
from router.gating import renormalise, top_k_gating
from serving.engine.moe_layer import moe_layer

torch.manual_seed(0)


def _weights(e: int, d: int, f: int) -> tuple[ExpertWeights, list]:
    experts = [
        (torch.randn(f, d) * 0.1, torch.randn(f, d) * 0.1, torch.randn(d, f) * 0.1)
        for _ in range(e)
    ]
    return ExpertWeights.stack(experts), experts


def _reference_moe(x, gate, experts, k):
    """Token by token, expert by expert: the definition of a top-k softmax MoE layer."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        probs = torch.softmax(x[t] @ gate.t(), dim=-1)
        top, idx = torch.topk(probs, k)
        top = top / top.sum()
        for w, e in zip(top.tolist(), idx.tolist(), strict=True):
            w1, w3, w2 = experts[e]
            out[t] += w * (w2 @ (F.silu(w1 @ x[t]) * (w3 @ x[t])))
    return out


def test_gating_matches_definition():
    logits = torch.randn(50, 8)
    g = top_k_gating(logits, 2)
    probs = torch.softmax(logits.double(), -1)
    for t in range(50):
        order = torch.argsort(probs[t], descending=True)[:2]
        assert g.experts[t].tolist() == order.tolist()
        expected = probs[t, order] / probs[t, order].sum()
        assert torch.allclose(g.weights[t].double(), expected, atol=1e-6)
    assert torch.allclose(g.weights.sum(-1), torch.ones(50))


def test_renormalise_over_kept_experts():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.6, 0.1, 0.3]])
    experts = torch.tensor([[0, 1], [0, 2]])
    keep = torch.tensor([[True, False], [False, False]])
    w = renormalise(probs, experts, keep)
    assert w.tolist() == [[1.0, 0.0], [0.0, 0.0]]


@pytest.mark.parametrize("tokens", [0, 1, 7, 300])
def test_grouped_compute_equals_loop_over_experts(tokens):
    weights, experts = _weights(6, 32, 48)
    slots = torch.randint(0, 6, (tokens, 2))
    x = torch.randn(tokens, 32)
    d = group_by_slot(slots, 6)
    y = grouped_swiglu(x[d.token_idx], d.counts, weights)
    ref = (
        torch.stack(
            [
                expert_forward(x[t], weights.w13[e], weights.w2[e])
                for t, e in zip(
                    d.token_idx.tolist(), slots.reshape(-1)[d.pair_idx].tolist(), strict=True
                )
            ]
        )
        if tokens
        else torch.zeros(0, 32)
    )
    assert torch.allclose(y, ref, atol=1e-5)
    loop = grouped_swiglu(x[d.token_idx], d.counts, weights, impl="loop")
    assert torch.allclose(_loop_swiglu(x[d.token_idx], d.counts, weights), loop)
    if tokens:
        assert not grouped_mm_supported(x)  # CPU: "auto" takes the loop (measured faster)
        grouped = grouped_swiglu(x[d.token_idx], d.counts, weights, impl="grouped_mm")
        assert torch.allclose(grouped, loop, atol=1e-5)


def test_dispatch_groups_contiguously_and_combine_inverts():
    slots = torch.tensor([[2, 0], [1, 2], [0, -1], [2, 1]])
    d = group_by_slot(slots, 3)
    assert d.counts.tolist() == [2, 2, 3]
    assert slots.reshape(-1)[d.pair_idx].tolist() == [0, 0, 1, 1, 2, 2, 2]  # -1 dropped
    assert d.segment(1, 3) == (2, 7)
    # combine with identity "experts": each token gets back the weighted sum of its kept copies
    x = torch.arange(4.0).unsqueeze(1).repeat(1, 3)
    w = torch.tensor([[0.5, 0.5], [0.25, 0.75], [1.0, 0.0], [0.1, 0.9]])
    out = combine(x[d.token_idx], d, w)
    assert torch.allclose(out, x * w.sum(-1, keepdim=True))


@pytest.mark.parametrize("packed", [False, True])
def test_moe_layer_equals_reference(packed):
    weights, experts = _weights(8, 32, 48)
    if packed:
        weights = weights.packed_for_cpu()
        assert weights.packed is not None or not cpu_kernels.available()
    gate = torch.randn(8, 32)
    x = torch.randn(64, 32)
    got = moe_layer(x, Linear(gate), LocalExpertPool([weights]), 0, top_k=2)
    assert torch.allclose(got, _reference_moe(x, gate, experts, 2), atol=1e-5)


def test_one_expert_top1_is_a_dense_swiglu_ffn():
    weights, [(w1, w3, w2)] = _weights(1, 32, 48)
    x = torch.randn(20, 32)
    got = moe_layer(x, Linear(torch.randn(1, 32)), LocalExpertPool([weights]), 0, top_k=1)
    dense = F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)
    assert torch.allclose(got, dense, atol=1e-6)


@pytest.mark.parametrize("tokens", [0, 1, 9, 200])
def test_dispatch_told_nothing_was_dropped_groups_alike(tokens):
    # may_drop=False skips the host check (what a CUDA graph needs): same grouping, same counts.
    slots = torch.randint(0, 5, (tokens, 2), generator=torch.Generator().manual_seed(tokens))
    a, b = group_by_slot(slots, 5), group_by_slot(slots, 5, may_drop=False)
    assert torch.equal(a.pair_idx, b.pair_idx) and torch.equal(a.token_idx, b.token_idx)
    assert torch.equal(a.counts, b.counts)
    assert a.counts.tolist() == torch.bincount(slots.reshape(-1), minlength=5).tolist()
