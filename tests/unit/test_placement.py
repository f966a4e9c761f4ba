"""Placement invariants (table tests) and hand-checked examples. Pure: no Ray, no GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from router.placement import (
    Placement,
    initial_placement,
    live_slots,
    orphaned_experts,
    place,
    place_layers,
    shard_load,
    slot_load,
)


def _zipf(num_experts: int, exponent: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.permutation(np.arange(1, num_experts + 1, dtype=float) ** -exponent) * 1000


def _check_invariants(p: Placement, num_experts: int, num_shards: int, num_redundant: int) -> None:
    assert p.num_slots == num_experts + num_redundant
    assert p.num_experts == num_experts and p.num_shards == num_shards
    per_shard = p.slots_per_shard()
    assert max(per_shard) - min(per_shard) <= 1
    assert bool((p.slot_shard.diff() >= 0).all())  # slots grouped shard by shard
    assert int(p.replica_counts.sum()) == p.num_slots
    for e in range(num_experts):
        slots = p.slots_of(e)
        assert len(slots) == int(p.replica_counts[e]) >= 1  # every expert has a copy
        assert p.phy2log[slots].eq(e).all()
        shards = p.slot_shard[slots].tolist()
        assert len(set(shards)) == len(shards)  # copies of one expert on different shards
    for s in range(num_shards):
        assert p.slot_shard[p.shard_slots(s)].eq(s).all()


CASES = [
    # (experts, shards, redundant, load)
    (64, 8, 16, "zipf"),
    (64, 8, 0, "zipf"),
    (8, 3, 0, "zipf"),  # 8 slots on 3 shards: 3/3/2
    (8, 3, 5, "zipf"),
    (6, 4, 1, "uniform"),
    (4, 3, 3, "uniform"),  # greedy packing dead-ends here; the repair move must fix it
    (5, 4, 15, "zipf"),  # R = E*(N-1): every expert on every shard
    (3, 1, 0, "zipf"),
    (16, 4, 7, "zeros"),
    (10, 7, 9, "one-hot"),
]


@pytest.mark.parametrize(("num_experts", "num_shards", "num_redundant", "kind"), CASES)
def test_placement_invariants(num_experts, num_shards, num_redundant, kind):
    load = {
        "zipf": _zipf(num_experts, 1.2, seed=num_experts),
        "uniform": np.ones(num_experts),
        "zeros": np.zeros(num_experts),
        "one-hot": np.eye(num_experts)[0],
    }[kind]
    p = place(load, num_shards, num_redundant)
    _check_invariants(p, num_experts, num_shards, num_redundant)
    assert int(p.replica_counts.max()) <= num_shards
    # Predicted load is conserved: split over copies, summed over shards.
    assert shard_load(p, load).sum().item() == pytest.approx(float(load.sum()))


@pytest.mark.parametrize("seed", range(5))
def test_random_loads_keep_invariants(seed):
    rng = np.random.default_rng(seed)
    for _ in range(20):
        num_experts, num_shards = int(rng.integers(1, 12)), int(rng.integers(1, 6))
        num_redundant = int(rng.integers(0, num_experts * (num_shards - 1) + 1))
        load = rng.pareto(1.0, num_experts) * rng.integers(0, 2, num_experts)
        _check_invariants(
            place(load, num_shards, num_redundant), num_experts, num_shards, num_redundant
        )


def test_replica_counts_go_to_highest_load_per_copy():
    # 8 | 4 2 1: the 8 first (-> 4 per copy), then the tie at 4 goes to the lower id again.
    p = place([8.0, 4.0, 2.0, 1.0], num_shards=4, num_redundant=2)
    assert p.replica_counts.tolist() == [3, 1, 1, 1]


def test_copies_capped_at_one_per_shard():
    p = place([100.0, 1.0, 1.0], num_shards=2, num_redundant=3)
    assert p.replica_counts.tolist() == [2, 2, 2]


def test_zipf_goal_shard_balance():
    load = _zipf(64, 1.2, seed=0)
    before, after = initial_placement(64, 8), place(load, 8, 16)
    cv = lambda x: float(x.std(correction=0) / x.mean())  # noqa: E731
    assert cv(shard_load(before, load)) > 0.5
    shards = shard_load(after, load)
    assert cv(shards) <= 0.15
    assert float(shards.max() / shards.mean()) <= 1.10


def test_initial_placement_is_round_robin():
    p = initial_placement(8, 3)
    assert p.slots_per_shard() == [3, 3, 2]
    assert [int(p.slot_shard[p.slots_of(e)[0]]) for e in range(8)] == [e % 3 for e in range(8)]
    _check_invariants(initial_placement(8, 3, 4), 8, 3, 4)


def test_hand_computed_loads():
    p = initial_placement(4, 2)  # shard 0: experts 0, 2; shard 1: experts 1, 3
    assert p.phy2log.tolist() == [0, 2, 1, 3]
    assert shard_load(p, [1.0, 2.0, 3.0, 4.0]).tolist() == [4.0, 6.0]
    q = place([6.0, 1.0, 1.0, 1.0], num_shards=2, num_redundant=1)  # expert 0 on both shards
    assert q.replica_counts.tolist() == [2, 1, 1, 1]
    assert sorted(slot_load(q, [6.0, 1.0, 1.0, 1.0]).tolist()) == [1.0, 1.0, 1.0, 3.0, 3.0]
    assert shard_load(q, [6.0, 1.0, 1.0, 1.0]).tolist() in ([4.0, 5.0], [5.0, 4.0])


def test_log2phy_padding():
    p = place([10.0, 1.0, 1.0], num_shards=3, num_redundant=2)
    assert p.log2phy.shape == (3, 3)
    assert (p.log2phy[1:, 1:] == -1).all()


def test_dead_shard_orphans_only_single_copies():
    single = initial_placement(4, 2)
    assert orphaned_experts(single, [0]) == [0, 2]
    assert live_slots(single, [0])[1] == single.slots_of(1)
    doubled = place(np.ones(4), num_shards=2, num_redundant=4)
    assert orphaned_experts(doubled, [0]) == [] and orphaned_experts(doubled, [1]) == []
    assert orphaned_experts(doubled, [0, 1]) == [0, 1, 2, 3]


def test_place_layers_shapes():
    assert len(place_layers(torch.ones(3, 8), 2, 2)) == 3
    assert len(place_layers(torch.ones(8), 2, 2)) == 1
    with pytest.raises(ValueError, match="L, E"):
        place_layers(torch.ones(2, 2, 2), 2, 0)


@pytest.mark.parametrize(
    ("load", "shards", "redundant", "message"),
    [
        ([1.0] * 4, 2, 5, r"E\*\(N-1\) = 4"),
        ([1.0] * 4, 0, 0, "at least one shard"),
        ([1.0] * 4, 2, -1, ">= 0"),
        ([1.0, -1.0], 2, 0, "non-negative"),
        ([], 2, 0, "non-empty"),
    ],
)
def test_bad_inputs_raise(load, shards, redundant, message):
    with pytest.raises(ValueError, match=message):
        place(load, shards, redundant)
