"""SwiGLU experts, stacked, and their grouped computation.

Shape legend:
  N  rows (token-expert pairs) sorted so that each expert's rows are contiguous
  E  experts held here (logical experts locally, physical slots on a shard)
  D  hidden size, F  expert FFN size

An expert computes  y = W2 (silu(W1 x) * (W3 x)).  W1 and W3 are stacked into one [2F, D] matrix
per expert (one GEMM instead of two), and all experts into w13 [E, 2F, D] and w2 [E, D, F].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from experts import cpu_kernels
from experts.gemm import Linear, linear


@dataclass
class ExpertWeights:
    """Stacked weights of E experts: w13 [E, 2F, D] (w1 rows first, then w3), w2 [E, D, F].

    `packed_for_cpu()` turns them into one Linear per projection per expert, packed for the CPU
    kernel (experts/gemm.py); the stacked tensors are then dropped (one copy of the weights, in
    one layout), and `expert(e)` unpacks an expert where one is needed whole.
    """

    w13: torch.Tensor | None
    w2: torch.Tensor | None
    packed: list[tuple[Linear, Linear]] | None = None  # per expert: (w13, w2)

    @classmethod
    def stack(
        cls, experts: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    ) -> ExpertWeights:
        """From per-expert (w1 [F, D], w3 [F, D], w2 [D, F]) to stacked tensors."""
        w13 = torch.stack([torch.cat([w1, w3], dim=0) for w1, w3, _ in experts])  # [E, 2F, D]
        w2 = torch.stack([w2 for _, _, w2 in experts])  # [E, D, F]
        return cls(w13=w13.contiguous(), w2=w2.contiguous())

    @property
    def num_experts(self) -> int:
        return len(self.packed) if self.packed is not None else self.w13.shape[0]

    def expert(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert e's (w13 [2F, D], w2 [D, F])."""
        if self.packed is not None:
            return self.packed[e][0].weight, self.packed[e][1].weight
        return self.w13[e], self.w2[e]

    def to(self, device: torch.device | str) -> ExpertWeights:
        if self.packed is not None:
            return (
                self
                if torch.device(device).type == "cpu"
                else ExpertWeights.stack(
                    [(*w13.chunk(2), w2) for w13, w2 in map(self.expert, range(self.num_experts))]
                ).to(device)
            )
        return ExpertWeights(self.w13.to(device), self.w2.to(device))

    def packed_for_cpu(self) -> ExpertWeights:
        """The same experts packed for the CPU kernel where it applies; else unchanged."""
        if self.packed is not None or self.w13.numel() == 0:
            return self
        layers = [(Linear(self.w13[e]), Linear(self.w2[e])) for e in range(self.num_experts)]
        if layers[0][0].packed is None:  # not a float32 CPU tensor, or no kernel here
            return self
        return ExpertWeights(None, None, layers)


def expert_forward(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """One expert: x [n, D], w13 [2F, D], w2 [D, F] -> [n, D]."""
    gate, up = linear(x, w13).chunk(2, dim=-1)  # [n, F] each
    return linear(F.silu(gate) * up, w2)


def grouped_swiglu(
    x: torch.Tensor, counts: torch.Tensor, weights: ExpertWeights, impl: str = "auto"
) -> torch.Tensor:
    """All experts over expert-sorted rows.

    x: [N, D] rows sorted by expert; counts: [E] rows per expert (sum N) -> [N, D].
    impl: "grouped_mm" (torch's grouped GEMM: one kernel per projection for all experts), "loop"
    (one GEMM per expert with rows), or "auto": grouped_mm where this torch build has it for the
    device and dtype, else the loop. Both give the same result to rounding.
    """
    if x.shape[0] == 0:
        return x.new_zeros(x.shape)
    if weights.packed is not None:
        return _packed_swiglu(x, counts, weights.packed)
    if impl == "auto":
        impl = "grouped_mm" if grouped_mm_supported(x, weights) else "loop"
    if impl == "grouped_mm":
        return _grouped_mm_swiglu(x, counts, weights)
    return _loop_swiglu(x, counts, weights)


def grouped_mm_supported(x: torch.Tensor, weights: ExpertWeights | None = None) -> bool:
    """Whether "auto" takes torch.nn.functional.grouped_mm: on CUDA for bf16 from compute
    capability 8.0, when every row stride is a multiple of 16 bytes (D and F multiples of 8 in
    bf16), which torch's CUDA grouped GEMM requires. On CPU the loop is used: grouped_mm exists
    there (torch >= 2.10) but measured ~10% slower than one MKL GEMM per expert
    (scripts/bench_forward.py, BENCHMARKS.md)."""
    if not hasattr(F, "grouped_mm"):
        return False
    if not (x.is_cuda and x.dtype == torch.bfloat16):
        return False
    rows = [x.shape[-1]] + ([weights.w2.shape[-1]] if weights is not None else [])
    aligned = all(n * x.element_size() % 16 == 0 for n in rows)
    return aligned and torch.cuda.get_device_capability(x.device) >= (8, 0)


def _loop_swiglu(x: torch.Tensor, counts: torch.Tensor, weights: ExpertWeights) -> torch.Tensor:
    out = torch.empty_like(x)
    start = 0
    for e, n in enumerate(counts.tolist()):
        if n:
            out[start : start + n] = expert_forward(
                x[start : start + n], weights.w13[e], weights.w2[e]
            )
        start += n
    return out


def _grouped_mm_swiglu(
    x: torch.Tensor, counts: torch.Tensor, weights: ExpertWeights
) -> torch.Tensor:
    offsets = torch.cumsum(counts.to(x.device), 0, dtype=torch.int32)  # [E] end row of each expert
    h = F.grouped_mm(x, weights.w13.transpose(1, 2), offs=offsets)  # [N, 2F]
    gate, up = h.chunk(2, dim=-1)
    return F.grouped_mm(F.silu(gate) * up, weights.w2.transpose(1, 2), offs=offsets)  # [N, D]


def _packed_swiglu(x: torch.Tensor, counts: torch.Tensor, packed: list) -> torch.Tensor:
    """Every expert in one call of the packed CPU kernel (experts/cpu_kernels.py): a decode
    step's experts see a few rows each, where a dozen operators per expert from Python cost as
    much as a GEMM."""
    w13, w2 = [p[0].packed for p in packed], [p[1].packed for p in packed]
    return cpu_kernels.swiglu(x, counts.tolist(), w13, w2, packed[0][1].in_features)
