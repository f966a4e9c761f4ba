"""Grouping token-expert pairs by physical slot, and combining expert outputs back in token order.

Shape legend: T tokens, K experts per token, N kept pairs (T*K less dropped ones), S slots, D hidden.

Dispatch sorts the T*K pairs by slot (stable, so tokens keep their order inside a slot) into
contiguous per-slot segments, which is what grouped expert compute wants. When slot ids are
numbered shard by shard, the same order also makes each shard's work one contiguous range.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Dispatch:
    """pair_idx [N]: flat index (t*K + k) of each sorted pair; token_idx [N]: its token;
    counts [S]: pairs per slot, in slot order (sum N)."""

    pair_idx: torch.Tensor
    token_idx: torch.Tensor
    counts: torch.Tensor

    def segments(self, slot_ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Row range [start, end) of the sorted pairs for each [first, last) range of slots."""
        offsets = [0, *torch.cumsum(self.counts, 0).tolist()]
        return [(offsets[first], offsets[last]) for first, last in slot_ranges]

    def segment(self, first_slot: int, last_slot: int) -> tuple[int, int]:
        """Row range [start, end) of the sorted pairs that belong to slots first..last-1."""
        return self.segments([(first_slot, last_slot)])[0]


def group_by_slot(slots: torch.Tensor, num_slots: int, may_drop: bool = True) -> Dispatch:
    """slots [T, K] (slot id per pair, -1 = dropped) -> Dispatch over num_slots slots.

    may_drop=False: the caller knows that no pair was dropped, so nothing is read back to the host
    (a CUDA graph records no host read: serving/engine/cuda_graphs.py)."""
    k = slots.shape[1]
    flat = slots.reshape(-1)  # [T*K]
    dropped = may_drop and bool((flat < 0).any())
    kept = torch.nonzero(flat >= 0).squeeze(1) if dropped else None
    keys = flat if kept is None else flat[kept]
    order = torch.argsort(keys, stable=True)  # [N]
    pair_idx = order if kept is None else kept[order]
    # Not torch.bincount: on CUDA it reads the largest key back to the host.
    counts = keys.new_zeros(num_slots).scatter_add_(0, keys, torch.ones_like(keys))  # [S]
    return Dispatch(pair_idx=pair_idx, token_idx=pair_idx // k, counts=counts)


def combine(y: torch.Tensor, dispatch: Dispatch, weights: torch.Tensor) -> torch.Tensor:
    """y [N, D] expert outputs in dispatch order, weights [T, K] -> [T, D] weighted sum per token.

    Pairs are put back in (token, k) order first and summed over k, so the sum runs in the same
    order whatever the placement: results do not depend on which shard computed what.
    """
    t, k = weights.shape
    pairs = y.new_zeros((t * k, y.shape[1]))  # [T*K, D]; dropped pairs stay zero
    pairs[dispatch.pair_idx] = y
    if y.dtype == torch.float32:
        return (pairs.view(t, k, -1) * weights.unsqueeze(-1)).sum(dim=1)
    # Lower precision: scale in float32 as transformers does, then sum in the activation dtype.
    return (pairs.view(t, k, -1).float() * weights.unsqueeze(-1)).to(y.dtype).sum(dim=1)
