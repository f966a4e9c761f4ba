"""experts.ffn.grouped_swiglu on CUDA in bf16: torch's grouped GEMM against one GEMM per expert,
both against the same arithmetic in fp32, with uneven expert loads (empty experts included)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from experts.ffn import ExpertWeights, grouped_mm_supported, grouped_swiglu

DEVICE = "cuda:0"
COUNTS = {  # rows per expert
    "uneven": [0, 5, 1, 0, 17, 3, 0, 40],
    "trailing-empty": [7, 0, 13, 0, 0, 2, 0, 0],
    "one-row": [0, 0, 0, 0, 0, 0, 0, 1],
    "one-expert": [64, 0, 0, 0, 0, 0, 0, 0],
}
SHAPES = {  # (hidden D, expert FFN F)
    "test-ckpt": (64, 96),
    "demo": (128, 256),
    "mixtral-8x7b": (4096, 14336),
}
# bf16 rounds the output and the [N, 2F] intermediate (~0.4% each): bound relative to the
# largest output magnitude.
BF16_REL = 2e-2

needs_grouped_mm = pytest.mark.skipif(
    not hasattr(F, "grouped_mm"), reason="this torch has no torch.nn.functional.grouped_mm"
)


def _inputs(counts: list[int], d: int, f: int):
    """x [N, D] and the experts' weights in bf16, plus the same bf16 values in fp32."""
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    e, n = len(counts), sum(counts)
    x = torch.randn(n, d, device=DEVICE, generator=gen).to(torch.bfloat16)
    w13 = (torch.randn(e, 2 * f, d, device=DEVICE, generator=gen) * d**-0.5).to(torch.bfloat16)
    w2 = (torch.randn(e, d, f, device=DEVICE, generator=gen) * f**-0.5).to(torch.bfloat16)
    bf16 = ExpertWeights(w13.contiguous(), w2.contiguous())
    fp32 = ExpertWeights(w13.float().contiguous(), w2.float().contiguous())
    return x, torch.tensor(counts), bf16, fp32


@needs_grouped_mm
def test_grouped_mm_supported_in_bf16_from_sm80():
    x = torch.zeros(4, 64, device=DEVICE, dtype=torch.bfloat16)
    sm80 = torch.cuda.get_device_capability(DEVICE) >= (8, 0)
    assert grouped_mm_supported(x) == sm80
    assert not grouped_mm_supported(x.float())  # fp32 keeps the per-expert loop
    assert not grouped_mm_supported(x.cpu())


@needs_grouped_mm
@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("load", sorted(COUNTS))
def test_grouped_mm_matches_loop_bf16(load, shape, no_tf32):
    d, f = SHAPES[shape]
    x, counts, w16, w32 = _inputs(COUNTS[load], d, f)
    grouped = grouped_swiglu(x, counts, w16, impl="grouped_mm")
    loop = grouped_swiglu(x, counts, w16, impl="loop")
    auto = grouped_swiglu(x, counts, w16, impl="auto")
    truth = grouped_swiglu(x.float(), counts, w32, impl="loop")  # same values, fp32 arithmetic
    assert grouped.shape == loop.shape == auto.shape == (sum(COUNTS[load]), d)
    assert grouped.dtype == torch.bfloat16
    assert bool(torch.isfinite(grouped.float()).all())
    scale = truth.abs().max().item()
    assert scale > 0
    for name, y in (("grouped_mm", grouped), ("loop", loop), ("auto", auto)):
        diff = (y.float() - truth).abs().max().item()
        assert diff < BF16_REL * scale, f"{name}: max |diff| {diff:.4g} vs scale {scale:.4g}"
    diff = (grouped.float() - loop.float()).abs().max().item()
    assert diff < BF16_REL * scale, f"grouped_mm vs loop: max |diff| {diff:.4g}"


@needs_grouped_mm
def test_auto_with_unaligned_dims_matches_loop(no_tf32):
    x, counts, w16, w32 = _inputs(COUNTS["uneven"], 60, 100)
    assert not grouped_mm_supported(x, w16)  # 120-byte rows: the loop, not a stride error
    auto = grouped_swiglu(x, counts, w16, impl="auto")
    truth = grouped_swiglu(x.float(), counts, w32, impl="loop")
    assert (auto.float() - truth).abs().max().item() < BF16_REL * truth.abs().max().item()
