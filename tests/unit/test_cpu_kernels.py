"""The packed CPU GEMM (experts/cpu_kernels.py) against torch's, on the shapes serving meets:
every row count from 0 up past the register tile, widths that do not fill the last block."""

from __future__ import annotations

import platform

import pytest
import torch
import torch.nn.functional as F

from experts import cpu_kernels
from experts.gemm import Linear

pytestmark = pytest.mark.skipif(
    platform.machine() not in ("x86_64", "AMD64"), reason="the packed kernel is x86 (AVX2/AVX-512)"
)


def test_it_builds_here():
    # On x86 with a C++ compiler (this project installs on such machines) the kernel must build:
    # a silent fallback would hide a 1.3-1.7x slower decode step.
    assert cpu_kernels.available()


@pytest.mark.parametrize(("n", "k"), [(3072, 512), (530, 96), (530, 300), (7, 33), (48, 1)])
@pytest.mark.parametrize("rows", [0, 1, 3, 7, 8, 9, 16, 65])
def test_packed_gemm_equals_torch(n, k, rows):
    g = torch.Generator().manual_seed(n + k + rows)
    w = torch.randn(n, k, generator=g)
    x = torch.randn(rows, k, generator=g)
    packed = cpu_kernels.pack(w)
    assert torch.equal(cpu_kernels.unpack(packed, n), w)
    got = cpu_kernels.mm(x, packed, n)
    assert got.shape == (rows, n)
    assert torch.allclose(got, F.linear(x, w), atol=1e-4 * k**0.5, rtol=1e-5)


def test_linear_packs_fp32_cpu_weights_only():
    w = torch.randn(64, 32)
    layer = Linear(w)
    assert layer.packed is not None and torch.equal(layer.weight, w)
    x = torch.randn(2, 5, 32)  # any leading shape
    assert torch.allclose(layer(x), F.linear(x, w), atol=1e-5)
    assert Linear(w.bfloat16()).packed is None  # bfloat16: torch's GEMM
