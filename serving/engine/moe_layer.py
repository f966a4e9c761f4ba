"""The MoE layer: gate -> assign -> dispatch -> compute -> combine, in one place.

Shape legend: T tokens, E logical experts, K experts per token, N kept pairs, D hidden.
"""

from __future__ import annotations

import torch

from experts.gemm import Linear
from experts.pool import ExpertPool, Pending
from router.dispatch import Dispatch, combine, group_by_slot
from router.gating import top_k_gating


def moe_layer(
    x: torch.Tensor, gate: Linear, pool: ExpertPool, layer: int, top_k: int
) -> torch.Tensor:
    """x [T, D], gate [E, D] router weight -> [T, D] mixture of each token's top-k experts."""
    return start_moe_layer(x, gate, pool, layer, top_k).result()


class MoeInFlight:
    """A MoE layer whose experts are computing; `result()` waits and combines: [T, D]."""

    def __init__(self, pending: Pending, dispatch: Dispatch, weights: torch.Tensor) -> None:
        self.pending, self.dispatch, self.weights = pending, dispatch, weights

    def result(self) -> torch.Tensor:
        y = self.pending.result()  # 4. (wait for) the experts: [N, D]
        return combine(y, self.dispatch, self.weights)  # 5. weighted sum per token: [T, D]


def start_moe_layer(
    x: torch.Tensor, gate: Linear, pool: ExpertPool, layer: int, top_k: int
) -> MoeInFlight:
    """Steps 1-4 of the MoE layer; with shards elsewhere the experts run while the caller goes
    on (two micro-batches in flight, serving/engine/model.py)."""
    gating = top_k_gating(gate(x), top_k)  # 1. gate: weights, experts [T, K]
    slots, weights = pool.assign(layer, gating)  # 2. assign each pair a physical slot
    dispatch = group_by_slot(slots, pool.num_slots(layer), pool.drops)  # 3. group pairs by slot
    pending = pool.start(layer, x[dispatch.token_idx], dispatch)  # 4. experts: [N, D]
    return MoeInFlight(pending, dispatch, weights)
