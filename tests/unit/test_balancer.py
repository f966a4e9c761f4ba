"""ExpertLoadBalancer: capacity, overflow policies, counts, windows and statistics. No Ray."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from router.balancer import TARGET_CV, ExpertLoadBalancer, OverflowCounts, cv, max_over_mean
from router.gating import top_k_gating
from router.placement import initial_placement, place, placement_gain

ROOT = Path(__file__).resolve().parents[2]


def _gating(num_tokens: int, num_experts: int, skew: float, seed: int):
    """Top-2 gating whose logits favour low expert ids by `skew` (a hot-expert batch)."""
    g = torch.Generator().manual_seed(seed)
    bias = -skew * torch.log(torch.arange(1, num_experts + 1, dtype=torch.float32))
    return top_k_gating(torch.randn(num_tokens, num_experts, generator=g) + bias, 2)


PLACEMENTS = {
    "8x2": lambda: initial_placement(8, 2),
    "8x3+4": lambda: place(torch.arange(8, 0, -1).double(), 3, 4),
    "16x4+8": lambda: place(1.0 / torch.arange(1, 17).double(), 4, 8),
}


@pytest.mark.parametrize("overflow", ["split", "reroute", "drop"])
@pytest.mark.parametrize("name", sorted(PLACEMENTS))
@pytest.mark.parametrize(("num_tokens", "skew"), [(1, 0.0), (64, 0.0), (512, 2.0)])
def test_policy_invariants(overflow, name, num_tokens, skew):
    placement = PLACEMENTS[name]()
    gating = _gating(num_tokens, placement.num_experts, skew, seed=num_tokens)
    balancer = ExpertLoadBalancer([placement], overflow=overflow)
    a = balancer.assign(0, gating.experts, gating.weights, gating.probs)
    kept = a.slots >= 0
    # Counts conserved: tokens in = tokens out + dropped.
    assert int(kept.sum()) + a.counts.dropped == gating.experts.numel()
    assert int((~kept).sum()) == a.counts.dropped
    # Every kept pair sits on a copy of the expert that serves it.
    assert torch.equal(placement.phy2log[a.slots[kept]], a.experts[kept])
    per_slot = torch.bincount(a.slots[kept], minlength=placement.num_slots)
    if overflow == "split":
        assert a.counts == OverflowCounts(split=a.counts.split)
        assert torch.equal(a.experts, gating.experts) and torch.equal(a.weights, gating.weights)
    if overflow == "drop" or (overflow == "reroute" and a.counts.split == 0):
        assert int(per_slot.max()) <= a.capacity  # capacity respected
    if overflow == "drop":
        assert (a.weights[~kept] == 0).all()
        assert torch.equal(a.weights[kept], gating.weights[kept])
    if overflow == "reroute":
        assert a.counts.dropped == 0
        assert int((a.experts != gating.experts).sum()) == a.counts.rerouted
        assert all(len(set(row)) == len(row) for row in a.experts.tolist())
        assert torch.allclose(a.weights.sum(1), torch.ones(num_tokens))
    assert balancer.counters()[0] == a.counts


def test_skewed_batch_overflows_and_is_counted():
    placement = initial_placement(8, 2)
    gating = _gating(512, 8, skew=2.0, seed=1)
    counts = {
        policy: ExpertLoadBalancer([placement], overflow=policy)
        .assign(0, gating.experts, gating.weights, gating.probs)
        .counts
        for policy in ("split", "reroute", "drop")
    }
    assert counts["split"].split > 0
    assert counts["drop"].dropped == counts["split"].split
    assert counts["reroute"].rerouted + counts["reroute"].split == counts["split"].split
    assert counts["reroute"].rerouted > 0


def _one_hot_batch():
    """4 tokens, top-1, all on expert 0 of 2 slots: capacity ceil(1.25 * 4 / 2) = 3, one over."""
    experts = torch.zeros(4, 1, dtype=torch.long)
    weights = torch.tensor([[0.9], [0.6], [0.8], [0.7]])
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.8, 0.2], [0.7, 0.3]])
    return experts, weights, probs


def test_hand_example_per_policy():
    experts, weights, probs = _one_hot_batch()
    placement = initial_placement(2, 1)
    split = ExpertLoadBalancer([placement]).assign(0, experts, weights)
    assert split.capacity == 3 and split.counts == OverflowCounts(split=1)
    assert split.slots.flatten().tolist() == [0, 0, 0, 0]
    drop = ExpertLoadBalancer([placement], overflow="drop").assign(0, experts, weights)
    assert drop.slots.flatten().tolist() == [0, -1, 0, 0]  # the lowest-weight pair goes
    assert drop.weights.flatten().tolist() == pytest.approx([0.9, 0.0, 0.8, 0.7])
    reroute = ExpertLoadBalancer([placement], overflow="reroute").assign(0, experts, weights, probs)
    assert reroute.counts == OverflowCounts(rerouted=1)
    assert reroute.experts.flatten().tolist() == [0, 1, 0, 0]
    assert reroute.weights.flatten().tolist() == pytest.approx([0.9, 1.0, 0.8, 0.7])  # top-1: p/p


def test_reroute_renormalises_like_mixtral():
    placement = initial_placement(4, 1)
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).repeat(4, 1)  # every token: experts 0, 1
    experts = torch.tensor([[0, 1]]).repeat(4, 1)
    weights = torch.tensor([[0.625, 0.375]]).repeat(4, 1)
    a = ExpertLoadBalancer([placement], overflow="reroute").assign(0, experts, weights, probs)
    assert a.capacity == 3 and a.counts.rerouted == 2  # one pair over on each of experts 0, 1
    for row, w in zip(a.experts.tolist(), a.weights.tolist(), strict=True):
        chosen = probs[0, row]
        assert w == pytest.approx((chosen / chosen.sum()).tolist())


def test_split_spreads_an_expert_evenly_over_its_copies():
    placement = place([10.0, 1.0, 1.0, 1.0], num_shards=3, num_redundant=2)
    assert placement.replica_counts[0] == 3
    experts = torch.zeros(9, 1, dtype=torch.long)
    a = ExpertLoadBalancer([placement]).assign(0, experts, torch.ones(9, 1))
    assert torch.bincount(a.slots.flatten(), minlength=6)[placement.slots_of(0)].tolist() == [
        3,
        3,
        3,
    ]


def test_hand_computed_cv_and_max_over_mean():
    assert cv(torch.tensor([1.0, 1.0, 1.0, 1.0])) == 0.0
    assert cv(torch.tensor([2.0, 0.0])) == pytest.approx(1.0)
    assert cv(torch.tensor([1.0, 2.0, 3.0])) == pytest.approx(math.sqrt(2 / 3) / 2)
    assert max_over_mean(torch.tensor([1.0, 2.0, 3.0])) == pytest.approx(1.5)
    assert cv(torch.zeros(3)) == 0.0 and max_over_mean(torch.zeros(3)) == 0.0


def test_stats_from_recorded_counts():
    placement = initial_placement(4, 2)  # slots 0, 1 on shard 0; slots 2, 3 on shard 1
    balancer = ExpertLoadBalancer([placement], window=2)
    balancer.record(0, torch.tensor([3, 2, 1, 2]), torch.tensor([3, 1, 2, 2]))
    s = balancer.stats()[0]
    assert (s.cv_shards, s.max_over_mean_shards) == (0.0, 1.0)  # shards 4 and 4
    assert s.cv_slots == pytest.approx(math.sqrt(0.5) / 2)
    assert s.max_over_mean_slots == pytest.approx(1.5)
    assert (s.batches, s.tokens) == (1, 8)


def test_window_slides():
    placement = initial_placement(2, 2)
    balancer = ExpertLoadBalancer([placement, placement], window=2)
    for i in range(1, 4):
        balancer.record(0, torch.tensor([i, 0]), torch.tensor([i, 0]))
    assert balancer.tokens_per_expert().tolist() == [[5, 0], [0, 0]]  # batches 2 and 3
    assert balancer.trace() == {"tokens_per_expert": [[5, 0], [0, 0]]}
    assert balancer.stats()[0].batches == 2


def test_assign_records_demand_and_slot_load():
    experts, weights, _ = _one_hot_batch()
    balancer = ExpertLoadBalancer([initial_placement(2, 1)], overflow="drop")
    balancer.assign(0, experts, weights)
    assert balancer.tokens_per_expert().tolist() == [[4, 0]]  # demand counts the dropped pair
    assert balancer.slot_load(0).tolist() == [3, 0]
    balancer.assign(0, experts, weights)
    assert balancer.counters()[0] == OverflowCounts(dropped=2)


def test_should_rebalance_needs_a_full_window_above_target():
    balancer = ExpertLoadBalancer([initial_placement(4, 2)], window=2)
    skewed = (torch.tensor([4, 0, 0, 0]), torch.tensor([4, 0, 0, 0]))
    balancer.record(0, *skewed)
    assert balancer.should_rebalance() == []
    balancer.record(0, *skewed)
    assert balancer.stats()[0].cv_shards > TARGET_CV == 0.15
    assert balancer.should_rebalance() == [0]
    even = (torch.tensor([1, 1, 1, 1]), torch.tensor([1, 1, 1, 1]))
    balancer.record(0, *even)
    balancer.record(0, *even)
    assert balancer.should_rebalance() == []


def test_placement_gain_is_large_only_where_a_placement_can_even_the_load():
    balancer = ExpertLoadBalancer([initial_placement(4, 2)], window=4)  # shard 0: 0, 2; 1: 1, 3
    balancer.record(0, torch.tensor([2, 0, 2, 0]), torch.tensor([2, 2, 0, 0]))

    def gain(b: ExpertLoadBalancer, redundant: int) -> tuple[float, float]:
        return placement_gain([b.placement(0)], b.tokens_per_expert(), redundant)

    now, new = gain(balancer, 0)
    assert now == pytest.approx(1.0) and new == pytest.approx(0.0)
    balancer.set_placement(0, place(balancer.tokens_per_expert()[0], 2, 0))
    assert gain(balancer, 0) == pytest.approx((0.0, 0.0))  # placed: nothing to gain
    hot = ExpertLoadBalancer([initial_placement(4, 2)], window=4)
    hot.record(0, torch.tensor([4, 0, 0, 0]), torch.tensor([4, 0, 0, 0]))
    assert gain(hot, 0) == pytest.approx((1.0, 1.0))  # one expert: no placement helps
    assert gain(hot, 1)[1] == pytest.approx(0.0)  # a second copy does


def test_set_placement_restarts_only_the_slot_window():
    balancer = ExpertLoadBalancer([initial_placement(4, 2)], window=4)
    balancer.record(0, torch.tensor([4, 0, 0, 0]), torch.tensor([4, 0, 0, 0]))
    balancer.set_placement(0, place(balancer.tokens_per_expert()[0], 2, 1))
    assert balancer.placement(0).num_slots == 5
    assert balancer.slot_load(0).tolist() == [0] * 5
    assert balancer.tokens_per_expert().tolist() == [[4, 0, 0, 0]]


def test_bad_inputs_raise():
    placement = initial_placement(4, 2)
    with pytest.raises(ValueError, match="overflow"):
        ExpertLoadBalancer([placement], overflow="spill")
    reroute = ExpertLoadBalancer([placement], overflow="reroute")
    with pytest.raises(ValueError, match="scores"):
        reroute.assign(0, torch.zeros(2, 2, dtype=torch.long), torch.ones(2, 2))
    with pytest.raises(ValueError, match="expert ids"):
        ExpertLoadBalancer([placement]).assign(0, torch.full((2, 2), 4), torch.ones(2, 2))
    with pytest.raises(ValueError, match=r"\[T, K\]"):
        ExpertLoadBalancer([placement]).assign(0, torch.zeros(4, dtype=torch.long), torch.ones(4))


def test_copies_share_an_expert_even_when_each_batch_gives_it_one_pair():
    """Small batches (a few decode rows) give most experts one pair each: a fixed first copy
    would send all of them to the shards holding first copies, and no rebalance could help."""
    from router.placement import initial_placement

    placement = initial_placement(8, 2, 8)  # every expert on both shards
    balancer = ExpertLoadBalancer([placement], window=64)
    for step in range(64):
        experts = torch.tensor([[step % 8, (step + 3) % 8]])  # one token, two experts
        balancer.assign(0, experts, torch.full((1, 2), 0.5))
    stats = balancer.stats()[0]
    assert stats.cv_shards < 0.05, stats
