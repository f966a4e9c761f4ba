"""Placement of logical experts onto physical slots and shards, in the style of DeepSeek's EPLB.

A logical expert is an expert of the model; a physical slot is one copy of it on a shard. With E
experts, N shards and R redundant slots there are P = E + R slots. When P is not divisible by N the
shards get uneven slot counts (the first P % N shards hold one slot more) rather than padding with
empty slots: every slot then holds a real copy and slot counts per shard differ by at most one.

Slots are numbered shard by shard: shard 0 holds slots [0, n_0), shard 1 the next n_1, and so on,
so a shard's slots are one contiguous range.

Shape legend:
# E logical experts, P physical slots, N shards, L layers, T tokens, K top-k, C max copies
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

# The local search stops at this many swaps per layer; in practice it converges in far fewer.
_MAX_SWAPS_PER_SLOT = 4


@dataclass(frozen=True, eq=False)
class Placement:
    """Where every copy of every logical expert lives, for one MoE layer.

    phy2log: LongTensor[P], the logical expert of each physical slot.
    slot_shard: LongTensor[P], the shard of each slot (non-decreasing: slots are grouped by shard).
    log2phy: LongTensor[E, C], the slots of each logical expert, padded with -1.
    replica_counts: LongTensor[E], copies per logical expert (>= 1).
    num_shards: N.
    """

    phy2log: torch.Tensor
    slot_shard: torch.Tensor
    log2phy: torch.Tensor
    replica_counts: torch.Tensor
    num_shards: int

    @property
    def num_experts(self) -> int:
        return int(self.replica_counts.numel())

    @property
    def num_slots(self) -> int:
        return int(self.phy2log.numel())

    def shard_slots(self, shard: int) -> list[int]:
        """Slot ids held by `shard`, ascending."""
        return torch.nonzero(self.slot_shard == shard).flatten().tolist()

    def slots_of(self, expert: int) -> list[int]:
        """Slot ids holding a copy of logical `expert`, ascending."""
        row = self.log2phy[expert]
        return row[row >= 0].tolist()

    def slots_per_shard(self) -> list[int]:
        """Number of slots on each shard: [N]."""
        return torch.bincount(self.slot_shard, minlength=self.num_shards).tolist()

    def shard_ranges(self) -> list[tuple[int, int]]:
        """[first, last) slot range of each shard: slots are numbered shard by shard. [N]"""
        ends = np.cumsum(self.slots_per_shard()).tolist()
        return list(zip([0, *ends[:-1]], ends, strict=True))


def slot_counts_per_shard(num_slots: int, num_shards: int) -> list[int]:
    """Slots on each shard: P // N each, and one more on the first P % N shards."""
    base, extra = divmod(num_slots, num_shards)
    return [base + (1 if s < extra else 0) for s in range(num_shards)]


def place(
    load: torch.Tensor | np.ndarray | Sequence[float], num_shards: int, num_redundant: int
) -> Placement:
    """Replicate and pack the experts of one layer onto shards so that shard loads are even.

    load: [E] non-negative load per logical expert (e.g. tokens_per_expert over a window).
    Returns a Placement with P = E + R slots, copies of one expert on different shards.

    1. Replica counts: start with one copy each; R times give one more copy to the expert with the
       highest load per copy (never more than N copies: copies must sit on different shards).
    2. Packing: copies heaviest first (load per copy), each into the least-loaded shard that has a
       free slot and no copy of that expert yet. When no shard qualifies (all free slots are on
       shards that already hold the expert) a repair move frees a slot on another shard.
    3. Local search: while some swap of two slots between the most-loaded shard and another shard
       lowers the larger of the two shard loads, apply the best such swap. It matters where a few
       heavy copies dominate (few slots per shard); elsewhere greedy packing is already close.
    """
    weights = _as_load_vector(load)  # [E]
    num_experts = weights.size
    check_sizes(num_experts, num_shards, num_redundant)
    counts = _replica_counts(weights, num_shards, num_redundant)  # [E]
    capacity = slot_counts_per_shard(num_experts + num_redundant, num_shards)  # [N]
    shards = _pack(weights / counts, counts, capacity)  # list per shard of experts
    _local_search(shards, weights / counts)
    return _build(shards, counts, num_shards)


def place_layers(
    tokens_per_expert: torch.Tensor | np.ndarray | Sequence, num_shards: int, num_redundant: int
) -> list[Placement]:
    """`place` for every layer: tokens_per_expert [L, E] (or [E] for one layer) -> L Placements."""
    loads = torch.as_tensor(tokens_per_expert, dtype=torch.float64)
    if loads.dim() == 1:
        loads = loads.unsqueeze(0)  # [1, E]
    if loads.dim() != 2:
        raise ValueError(f"tokens_per_expert must be [L, E] or [E], got shape {list(loads.shape)}")
    return [place(row, num_shards, num_redundant) for row in loads]


def initial_placement(num_experts: int, num_shards: int, num_redundant: int = 0) -> Placement:
    """Placement for a start without load information: all experts equally loaded.

    With equal loads the packing deals experts round-robin (expert e on shard e % N when R = 0), so
    experts spread evenly over shards; redundant copies go to experts 0..R-1 on other shards.
    """
    return place(np.ones(num_experts), num_shards, num_redundant)


def slot_load(
    placement: Placement, load: torch.Tensor | np.ndarray | Sequence[float]
) -> torch.Tensor:
    """Predicted load per slot: [E] -> [P], an expert's load split evenly over its copies."""
    weights = torch.as_tensor(load, dtype=torch.float64)  # [E]
    per_copy = weights / placement.replica_counts.to(torch.float64)  # [E]
    return per_copy[placement.phy2log]  # [P]


def shard_load(
    placement: Placement, load: torch.Tensor | np.ndarray | Sequence[float]
) -> torch.Tensor:
    """Predicted load per shard: [E] -> [N], an expert's load split evenly over its copies."""
    per_slot = slot_load(placement, load)  # [P]
    out = torch.zeros(placement.num_shards, dtype=torch.float64)
    return out.index_add_(0, placement.slot_shard, per_slot)  # [N]


def placement_gain(
    current: list[Placement], tokens_per_expert: torch.Tensor, num_redundant: int
) -> tuple[float, float]:
    """(worst layer's CV across shards now, under a placement from the demand): whether placing
    afresh can help at all, both predicted from tokens_per_expert [L, E] (an expert's load split
    evenly over its copies). Demand that no placement evens out (a random model's routing on few
    shards) gives a small gain, and rebalancing it again would only churn."""
    if tokens_per_expert.sum() == 0:
        return 0.0, 0.0
    fresh = place_layers(tokens_per_expert, current[0].num_shards, num_redundant)
    now = max(cv(shard_load(p, w)) for p, w in zip(current, tokens_per_expert, strict=True))
    new = max(cv(shard_load(p, w)) for p, w in zip(fresh, tokens_per_expert, strict=True))
    return now, new


def cv(load: torch.Tensor) -> float:
    """Coefficient of variation of a load vector: population std / mean (0 when the mean is 0)."""
    load = load.to(torch.float64)
    mean = load.mean()
    return 0.0 if mean <= 0 else float(load.std(correction=0) / mean)


def live_slots(placement: Placement, dead_shards: Iterable[int]) -> list[list[int]]:
    """Slots of each logical expert that survive when `dead_shards` are gone: E lists."""
    dead = set(dead_shards)
    shard_of = placement.slot_shard.tolist()
    return [
        [slot for slot in placement.slots_of(e) if shard_of[slot] not in dead]
        for e in range(placement.num_experts)
    ]


def orphaned_experts(placement: Placement, dead_shards: Iterable[int]) -> list[int]:
    """Logical experts with no copy left once `dead_shards` are gone (their requests fail fast)."""
    return [e for e, slots in enumerate(live_slots(placement, dead_shards)) if not slots]


def _as_load_vector(load: torch.Tensor | np.ndarray | Sequence[float]) -> np.ndarray:
    weights = torch.as_tensor(load, dtype=torch.float64).numpy()
    if weights.ndim != 1 or weights.size == 0:
        raise ValueError(f"load must be a non-empty [E] vector, got shape {list(weights.shape)}")
    if not np.all(np.isfinite(weights)) or np.any(weights < 0):
        raise ValueError("load must be finite and non-negative")
    return weights


def check_sizes(num_experts: int, num_shards: int, num_redundant: int) -> None:
    """ValueError (one line) unless E experts plus R copies fit on N shards, copies apart."""
    if num_shards < 1:
        raise ValueError(f"need at least one shard, got {num_shards}")
    if num_redundant < 0:
        raise ValueError(f"redundant slots must be >= 0, got {num_redundant}")
    limit = num_experts * (num_shards - 1)
    if num_redundant > limit:
        raise ValueError(
            f"{num_redundant} redundant slots is too many for {num_experts} experts on "
            f"{num_shards} shards: copies of one expert must sit on different shards, so at most "
            f"E*(N-1) = {limit}"
        )


def _replica_counts(weights: np.ndarray, num_shards: int, num_redundant: int) -> np.ndarray:
    """Step 1: [E] copies per expert, greedy on the highest load per copy (ties: lowest id)."""
    counts = np.ones(weights.size, dtype=np.int64)
    heap = [(-w, e) for e, w in enumerate(weights.tolist())]
    heapq.heapify(heap)
    for _ in range(num_redundant):
        _, e = heapq.heappop(heap)
        counts[e] += 1
        if counts[e] < num_shards:  # a full expert leaves the heap: one copy per shard at most
            heapq.heappush(heap, (-weights[e] / counts[e], e))
    return counts


def _pack(per_copy: np.ndarray, counts: np.ndarray, capacity: list[int]) -> list[list[int]]:
    """Step 2: heaviest copy first into the least-loaded eligible shard -> experts per shard."""
    shards: list[list[int]] = [[] for _ in capacity]
    totals = np.zeros(len(capacity))
    copies = np.repeat(np.arange(per_copy.size), counts)  # one entry per copy
    order = np.argsort(-per_copy[copies], kind="stable")
    for e in copies[order].tolist():
        eligible = [
            s for s in range(len(shards)) if len(shards[s]) < capacity[s] and e not in shards[s]
        ]
        s = min(eligible, key=lambda s: totals[s]) if eligible else _repair(shards, capacity, e)
        shards[s].append(e)
        totals[s] += per_copy[e]
    return shards


def _repair(shards: list[list[int]], capacity: list[int], expert: int) -> int:
    """Free a slot for `expert` on a full shard without it; returns that shard.

    Some shard t has a free slot but already holds `expert`; some full shard s lacks it. s holds at
    least as many experts as t minus one and differs from t, so it holds an expert f that t lacks:
    move f from s to t.
    """
    t = next(s for s in range(len(shards)) if len(shards[s]) < capacity[s])
    for s, held in enumerate(shards):
        if s == t or expert in held:
            continue
        movable = [f for f in held if f not in shards[t]]
        if movable:
            held.remove(movable[0])
            shards[t].append(movable[0])
            return s
    raise AssertionError("placement repair found no move; the E*(N-1) bound should prevent this")


def _local_search(shards: list[list[int]], per_copy: np.ndarray) -> None:
    """Step 3: swap slots between the most-loaded shard and others while the maximum drops."""
    totals = np.array([per_copy[held].sum() if held else 0.0 for held in shards])
    max_swaps = _MAX_SWAPS_PER_SLOT * sum(len(held) for held in shards)
    for _ in range(max_swaps):
        a = int(np.argmax(totals))
        best = None  # (new max of the pair, index in a, shard b, index in b)
        for i, e in enumerate(shards[a]):
            for b, held in enumerate(shards):
                if b == a or e in held:
                    continue
                for j, f in enumerate(held):
                    delta = per_copy[e] - per_copy[f]  # load moving from a to b
                    if delta <= 0 or f in shards[a]:
                        continue
                    worst = max(totals[a] - delta, totals[b] + delta)
                    # Strictly below the current maximum by a margin, so the search terminates.
                    if worst < totals[a] - 1e-12 * max(totals[a], 1.0) and (
                        best is None or worst < best[0]
                    ):
                        best = (worst, i, b, j)
        if best is None:
            return
        _, i, b, j = best
        e, f = shards[a][i], shards[b][j]
        shards[a][i], shards[b][j] = f, e
        delta = per_copy[e] - per_copy[f]
        totals[a] -= delta
        totals[b] += delta


def _build(shards: list[list[int]], counts: np.ndarray, num_shards: int) -> Placement:
    """Number slots shard by shard and derive the maps."""
    phy2log = [e for held in shards for e in sorted(held)]  # [P]
    slot_shard = [s for s, held in enumerate(shards) for _ in held]  # [P]
    log2phy = torch.full((counts.size, int(counts.max())), -1, dtype=torch.long)  # [E, C]
    filled = [0] * counts.size
    for slot, e in enumerate(phy2log):
        log2phy[e, filled[e]] = slot
        filled[e] += 1
    return Placement(
        phy2log=torch.tensor(phy2log, dtype=torch.long),
        slot_shard=torch.tensor(slot_shard, dtype=torch.long),
        log2phy=log2phy,
        replica_counts=torch.from_numpy(counts.copy()),
        num_shards=num_shards,
    )
