"""`linear(x, w)` = x @ w.T, oriented for the CPU's BLAS.

For few rows (decode steps, an expert's handful of tokens) MKL computes x @ w.T 1.2-3x slower
than the same product taken as (w @ x.T).T, which streams the weight row by row; for many rows the
two are equal. Measured on this project's 2-core CPU machine across the model's shapes ([32000,
512], [3072, 512], [512, 1536], [1024, 512], 1 to 2048 rows): the transposed form wins up to 128
rows. On GPUs cuBLAS picks its own kernels, so F.linear is used there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SKINNY_ROWS = 128


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., K], w [N, K] -> [..., N], contiguous (kernels downstream, SDPA's flash path among
    them, want a unit stride in the last dimension; the copy is small at these row counts)."""
    rows = x.numel() // x.shape[-1]
    if x.device.type != "cpu" or rows > SKINNY_ROWS or rows == 0:
        return F.linear(x, w)
    flat = x.reshape(rows, x.shape[-1])
    return (w @ flat.t()).t().contiguous().view(*x.shape[:-1], w.shape[0])
