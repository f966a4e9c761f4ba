"""The MoE layer: gate -> assign -> dispatch -> compute -> combine, in one place.

Shape legend: T tokens, E logical experts, K experts per token, N kept pairs, D hidden.

In float32 on a CPU that built the kernels, gating, dispatch and the combine (with the residual
add) are one C++ call each (experts/cpu_moe_source.py): the same experts and bits as router/'s
definitions, at a fraction of their operators' cost for a decode step's few tokens.
"""

from __future__ import annotations

import torch

from experts import cpu_kernels
from experts.gemm import Linear
from experts.pool import ExpertPool, Pending
from router.dispatch import Dispatch, combine, group_by_slot
from router.gating import Gating, top_k_gating

FUSED = True  # the C++ steps where they apply (off: router's operators, for comparisons)


def moe_layer(
    x: torch.Tensor,
    gate: Linear,
    pool: ExpertPool,
    layer: int,
    top_k: int,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [T, D], gate [E, D] router weight -> [T, D] mixture of each token's top-k experts (plus
    `residual` [T, D] when given: the decoder layer's sum, in the same pass)."""
    return start_moe_layer(x, gate, pool, layer, top_k).result(residual)


class MoeInFlight:
    """A MoE layer whose experts are computing; `result()` waits and combines: [T, D]."""

    def __init__(self, pending: Pending, dispatch: Dispatch, weights: torch.Tensor) -> None:
        self.pending, self.dispatch, self.weights = pending, dispatch, weights

    def result(self, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The mixture [T, D], plus `residual` [T, D] when given."""
        y = self.pending.result()  # 4. (wait for) the experts: [N, D]
        # 5. weighted sum per token (+ residual): [T, D]
        if FUSED and cpu_kernels.fits(y, self.weights):
            t, d = self.weights.shape[0], y.shape[1]
            h = residual if residual is not None else y.new_zeros(t, d)
            return cpu_kernels.combine_add(h, y, self.dispatch.pair_idx, self.weights)
        mixed = combine(y, self.dispatch, self.weights)
        return mixed if residual is None else residual + mixed


def start_moe_layer(
    x: torch.Tensor, gate: Linear, pool: ExpertPool, layer: int, top_k: int
) -> MoeInFlight:
    """Steps 1-4 of the MoE layer; with shards elsewhere the experts run while the caller goes
    on (two micro-batches in flight, serving/engine/model.py)."""
    fast = FUSED and cpu_kernels.fits(x)
    gating = _top_k_gating(gate(x), top_k, fast)  # 1. gate: weights, experts [T, K]
    slots, weights = pool.assign(layer, gating)  # 2. assign each pair a physical slot
    dispatch = _group_by_slot(slots, pool.num_slots(layer), pool.drops, fast)  # 3. group by slot
    pending = pool.start(layer, x.index_select(0, dispatch.token_idx), dispatch)  # 4. [N, D]
    return MoeInFlight(pending, dispatch, weights)


def _top_k_gating(router_logits: torch.Tensor, k: int, fast: bool) -> Gating:
    if fast:
        return Gating(*cpu_kernels.top_k_gating(router_logits, k))
    return top_k_gating(router_logits, k)


def _group_by_slot(slots: torch.Tensor, num_slots: int, may_drop: bool, fast: bool) -> Dispatch:
    if fast:
        return Dispatch(*cpu_kernels.group_by_slot(slots, num_slots))
    return group_by_slot(slots, num_slots, may_drop)
