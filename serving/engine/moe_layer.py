"""The MoE layer: gate -> assign -> dispatch -> compute -> combine, in one place.

Shape legend: T tokens, E logical experts, K experts per token, N kept pairs, D hidden.
"""

from __future__ import annotations

import torch

from experts.gemm import Linear
from experts.pool import ExpertPool
from router.dispatch import combine, group_by_slot
from router.gating import top_k_gating


def moe_layer(
    x: torch.Tensor, gate: Linear, pool: ExpertPool, layer: int, top_k: int
) -> torch.Tensor:
    """x [T, D], gate [E, D] router weight -> [T, D] mixture of each token's top-k experts."""
    gating = top_k_gating(gate(x), top_k)  # 1. gate: weights, experts [T, K]
    slots, weights = pool.assign(layer, gating)  # 2. assign each pair a physical slot
    dispatch = group_by_slot(slots, pool.num_slots(layer))  # 3. group pairs by slot
    y = pool.compute(layer, x[dispatch.token_idx], dispatch)  # 4. experts: [N, D]
    return combine(y, dispatch, weights)  # 5. weighted sum per token: [T, D]
