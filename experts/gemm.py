"""x @ w.T for the model's weights, prepared once at load for where they live.

On a CPU in float32 a weight is packed for the few-row GEMM of experts/cpu_kernels.py, which
reads it once per call: measured 1.3-1.7x faster than MKL for the 4 to 32 rows a decode step
gives each weight, equal from 64 rows up (scripts/bench_gemm.py, BENCHMARKS.md). Elsewhere (a GPU,
bfloat16, a CPU without AVX2 or a compiler) torch's own GEMM serves; on a CPU oriented as
(w @ x.T).T for few rows, which MKL computes faster than x @ w.T there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from experts import cpu_kernels

SKINNY_ROWS = 128
PACKED = True  # use the packed CPU kernel where it applies (off: torch's GEMM, for comparisons)


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., K], w [N, K] -> [..., N] with torch's GEMM, contiguous (kernels downstream, SDPA's
    flash path among them, want a unit stride in the last dimension)."""
    rows = x.numel() // x.shape[-1]
    if x.device.type != "cpu" or rows > SKINNY_ROWS or rows == 0:
        return F.linear(x, w)
    flat = x.reshape(rows, x.shape[-1])
    return (w @ flat.t()).t().contiguous().view(*x.shape[:-1], w.shape[0])


class Linear:
    """A weight w [N, K]; `layer(x [..., K]) -> [..., N]` = x @ w.T."""

    def __init__(self, w: torch.Tensor) -> None:
        self.out_features, self.in_features = w.shape
        self.packed = cpu_kernels.pack(w) if _packable(w) else None
        self._w = None if self.packed is not None else w  # one copy, in one layout

    @property
    def weight(self) -> torch.Tensor:
        """The weight as the checkpoint holds it, [N, K] (unpacked: a copy, for moving it)."""
        if self.packed is None:
            return self._w
        return cpu_kernels.unpack(self.packed, self.out_features)

    @property
    def device(self) -> torch.device:
        return (self._w if self.packed is None else self.packed).device

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return linear(x, self._w)
        rows = x.numel() // self.in_features
        y = cpu_kernels.mm(x.reshape(rows, self.in_features), self.packed, self.out_features)
        return y.view(*x.shape[:-1], self.out_features)


def _packable(w: torch.Tensor) -> bool:
    return (
        PACKED
        and w.device.type == "cpu"
        and w.dtype == torch.float32
        and w.dim() == 2
        and cpu_kernels.available()
    )
