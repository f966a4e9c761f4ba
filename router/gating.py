"""Top-k softmax gating with Mixtral's numerics.

Shape legend: T tokens, E logical experts, K experts per token (top-k).

Mixtral takes the softmax over all experts in float32, keeps the top k probabilities, renormalises
them to sum to one. The weights stay float32 and each expert's output is scaled in float32 before
it is added up, as transformers does; a bf16 softmax would change which expert wins a near tie.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Gating(NamedTuple):
    """weights [T, K] (float32), experts [T, K] (int64), probs [T, E] (float32)."""

    weights: torch.Tensor
    experts: torch.Tensor
    probs: torch.Tensor


def top_k_gating(router_logits: torch.Tensor, k: int) -> Gating:
    """router_logits [T, E] -> Gating; ties go where torch.topk sends them, as in transformers
    (not always to the lower expert index)."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)  # [T, E]
    top, experts = torch.topk(probs, k, dim=-1)  # [T, K]
    top = top / top.sum(dim=-1, keepdim=True)
    return Gating(top, experts, probs)


def renormalise(probs: torch.Tensor, experts: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Weights over a token's final experts after some were changed or dropped.

    probs [T, E] float32, experts [T, K], keep [T, K] bool -> weights [T, K] float32 that sum to one
    over the kept experts (a token with none kept gets all zeros).
    """
    chosen = torch.gather(probs, 1, experts) * keep  # [T, K]
    total = chosen.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, chosen / total.clamp_min(torch.finfo(total.dtype).tiny), 0.0)
