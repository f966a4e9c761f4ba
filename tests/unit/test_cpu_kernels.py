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


def test_it_runs_on_torch_threads():
    # Built without OpenMP, the kernel's parallel loop would run on one thread whatever
    # torch.set_num_threads says: a CPU engine or shard given many cores would use one.
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert cpu_kernels.threads_used(64) == 2
    finally:
        torch.set_num_threads(before)


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


def test_fused_experts_equal_one_expert_at_a_time():
    # Every expert of a layer in one call (experts without rows among them) against torch's
    # SwiGLU per expert; counts that do not add up to the rows are refused, not read past.
    from experts.ffn import ExpertWeights, expert_forward

    g = torch.Generator().manual_seed(0)
    d, f, counts = 96, 200, [3, 0, 9, 1, 0, 17]
    experts = [
        (torch.randn(f, d, generator=g), torch.randn(f, d, generator=g),
         torch.randn(d, f, generator=g))
        for _ in counts
    ]  # fmt: skip
    x = torch.randn(sum(counts), d, generator=g)
    packed = ExpertWeights.stack(experts).packed_for_cpu().packed
    w13, w2 = [p[0].packed for p in packed], [p[1].packed for p in packed]
    got = cpu_kernels.swiglu(x, counts, w13, w2, f)
    rows = x.split(counts)
    want = torch.cat(
        [
            expert_forward(r, torch.cat([a, b]), c)
            for r, (a, b, c) in zip(rows, experts, strict=True)
        ]
    )
    assert torch.allclose(got, want, atol=1e-3, rtol=1e-4)
    with pytest.raises(RuntimeError, match="counts"):
        cpu_kernels.swiglu(x, [*counts[:-1], 18], w13, w2, f)
    with pytest.raises(RuntimeError, match="counts"):
        cpu_kernels.swiglu(x, [*counts[:-1], 16], w13, w2, f)
