"""The CPU kernels (experts/cpu_kernels.py) against torch: the packed GEMM on the shapes serving meets:
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


def _advised_huge(t: torch.Tensor) -> bool:
    """Whether the memory at t's first element was advised huge (madvise MADV_HUGEPAGE: the
    mapping's VmFlags carry "hg"), read from /proc/self/smaps."""
    at, inside = t.data_ptr(), False
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(a, 16) for a in head.split("-"))
            inside = lo <= at < hi
        elif inside and head == "VmFlags:":
            return "hg" in line.split()[1:]
    return False


@pytest.mark.skipif(platform.system() != "Linux", reason="madvise and /proc/self/smaps: Linux")
def test_packed_weights_and_zeros_are_advised_onto_huge_pages_and_hold_the_same_values():
    # A decode step streams every weight once; on 4 KiB pages the hardware prefetcher stops at
    # every page boundary (BENCHMARKS.md: the decode step 6-7% slower). The same bits either way.
    w = torch.randn(1536, 512, generator=torch.Generator().manual_seed(0))  # 3 MiB: over a page
    huge = cpu_kernels.pack(w)
    before = cpu_kernels.set_huge_pages(False)
    try:
        small = cpu_kernels.pack(w)
        plain_zeros = cpu_kernels.zeros((4, 1 << 19))
    finally:
        cpu_kernels.set_huge_pages(before)
    assert before is True  # the default
    assert _advised_huge(huge)  # (off, memory may still sit where an earlier pack advised)
    assert huge.data_ptr() % (2 << 20) == 0 and huge.is_contiguous()
    assert torch.equal(huge, small) and torch.equal(cpu_kernels.unpack(huge, 1536), w)
    zeros = cpu_kernels.zeros((4, 1 << 19))  # 8 MiB
    assert _advised_huge(zeros) and not plain_zeros.any()
    assert zeros.shape == (4, 1 << 19) and zeros.dtype == torch.float32
    assert not zeros.any() and zeros.is_contiguous()
    tiny = cpu_kernels.zeros((3, 5))  # under a page: plain memory, still zeros
    assert tiny.shape == (3, 5) and not tiny.any()


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


def test_fused_silu_is_torchs_across_its_range():
    # Identity weights make the expert x -> silu(x) * x, so the kernel's own silu (e^-|x|, never
    # overflowing) is compared with torch's over saturating, tiny and zero inputs; 40 columns:
    # whole vectors and a scalar tail.
    n = 40
    eye = torch.eye(n)
    w13, w2 = cpu_kernels.pack(torch.cat([eye, eye])), cpu_kernels.pack(eye)
    x = torch.cat([torch.linspace(-95, 95, 7 * n), torch.tensor([0.0, -0.0, 1e-30, -1e-30] * 10)])
    x = x.reshape(-1, n)  # [8, 40]
    got = cpu_kernels.swiglu(x, [x.shape[0]], [w13], [w2], n)
    want = F.silu(x) * x
    # Below -87 both are ~0 (torch's e^-x overflows to inf, ours stops at e^-87.3): atol 1e-30.
    assert torch.allclose(got, want, rtol=2e-6, atol=1e-30)


@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim"),
    [(8, 2, 64), (32, 8, 128), (4, 4, 32), (16, 2, 64), (12, 2, 16)],  # 4, 4, 1, 8, 6 per group
)
@pytest.mark.parametrize("window", [None, 5])
def test_decode_attention_equals_sdpa_row_by_row(heads, kv_heads, head_dim, window):
    # Rows in scattered slots at different positions (what a mask and a gather served before),
    # with and without a sliding window, against SDPA over each row's own keys.
    g = torch.Generator().manual_seed(heads + head_dim)
    slots_in_cache, capacity, rows = 9, 40, 6
    k = torch.randn(slots_in_cache, kv_heads, capacity, head_dim, generator=g)
    v = torch.randn(slots_in_cache, kv_heads, capacity, head_dim, generator=g)
    q = torch.randn(rows, heads, head_dim, generator=g)
    slots = torch.tensor([7, 0, 3, 8, 1, 5])
    positions = torch.tensor([0, 39, 4, 17, 5, 33])
    got = cpu_kernels.decode_attention(q, k, v, slots, positions, window, head_dim**-0.5)
    for d in range(rows):
        end = int(positions[d]) + 1
        start = max(0, end - window) if window else 0
        keys, values = (t[slots[d], None, :, start:end] for t in (k, v))  # [1, G, L, Dh]
        want = F.scaled_dot_product_attention(q[d, None, :, None], keys, values, enable_gqa=True)
        assert torch.allclose(got[d], want[0, :, 0], atol=1e-5), d


def test_decode_attention_refuses_what_it_cannot_read():
    assert cpu_kernels.decode_attention_fits(64) and not cpu_kernels.decode_attention_fits(20)
    with pytest.raises(RuntimeError, match="head sizes"):
        cpu_kernels.decode_attention(
            torch.zeros(1, 2, 20), *[torch.zeros(2, 1, 8, 20)] * 2, torch.tensor([0]),
            torch.tensor([1]), None, 0.25,
        )  # fmt: skip
    k = v = torch.zeros(2, 1, 8, 16)
    q = torch.zeros(1, 2, 16)
    with pytest.raises(RuntimeError, match="outside the cache"):
        cpu_kernels.decode_attention(q, k, v, torch.tensor([0]), torch.tensor([8]), None, 0.25)
    with pytest.raises(RuntimeError, match="outside the cache"):
        cpu_kernels.decode_attention(q, k, v, torch.tensor([2]), torch.tensor([1]), None, 0.25)
    with pytest.raises(RuntimeError, match="float32"):
        cpu_kernels.decode_attention(
            q.bfloat16(), k.bfloat16(), v.bfloat16(), torch.tensor([0]), torch.tensor([1]), None, 1
        )


def test_first_max_is_torchs_max_ties_infinities_and_nan_included():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 3, (12, 1003), generator=g).float()  # ties; a width of no whole vector
    x[1, 500] = x[1, 900] = float("inf")
    x[2] = float("-inf")
    x[3, 1001] = float("nan")  # in the tail past the last whole vector
    x[4, 10] = float("inf")
    x[4, 20] = float("nan")  # a NaN after the maximum still wins
    x[5, 40] = x[5, 41] = float("nan")
    assert torch.equal(cpu_kernels.first_max(x), x.max(dim=-1).indices)
    with pytest.raises(RuntimeError, match="float32"):
        cpu_kernels.first_max(x.double())


def test_rms_norm_is_mixtrals():
    from serving.engine.model import rms_norm

    g = torch.Generator().manual_seed(0)
    for shape in ((16, 512), (3, 7, 40), (1, 24)):  # rows, batch x seq, a scalar tail
        x = torch.randn(shape, generator=g) * 3
        w = torch.randn(shape[-1], generator=g)
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
        assert torch.allclose(rms_norm(x, w, 1e-5), w * h, rtol=1e-5, atol=1e-6)
        assert torch.allclose(cpu_kernels.rms_norm(x, w, 1e-5), w * h, rtol=1e-5, atol=1e-6)


def test_kv_write_is_index_put_and_refuses_outside_the_cache():
    g = torch.Generator().manual_seed(0)
    cache = torch.zeros(5, 2, 9, 16)  # [S, G, M, Dh]
    want = cache.clone()
    src = torch.randn(4, 2, 16, generator=g)  # [T, G, Dh]
    slots, positions = torch.tensor([3, 0, 4, 1]), torch.tensor([8, 0, 5, 2])
    cpu_kernels.kv_write(cache, slots, positions, src)
    want[slots, :, positions] = src
    assert torch.equal(cache, want)
    for bad_slots, bad_positions in (([5, 0, 4, 1], [8, 0, 5, 2]), ([3, 0, 4, 1], [8, 9, 5, 2])):
        with pytest.raises(RuntimeError, match="outside the cache"):
            cpu_kernels.kv_write(cache, torch.tensor(bad_slots), torch.tensor(bad_positions), src)
    assert torch.equal(cache, want)  # refused before writing anything


def test_prefetch_changes_no_result_and_is_set_by_measuring():
    # Prefetching is a hint: with it and without, the same bits. `tune` leaves the process on
    # the setting it measured as faster, and says which.
    from experts import prefetch
    from experts.ffn import ExpertWeights

    g = torch.Generator().manual_seed(1)
    d, f, counts = 64, 160, [4, 2, 0, 5]
    weights = ExpertWeights.stack(
        [tuple(torch.randn(*s, generator=g) for s in ((f, d), (f, d), (d, f))) for _ in counts]
    ).packed_for_cpu()
    w13, w2 = [p[0].packed for p in weights.packed], [p[1].packed for p in weights.packed]
    x = torch.randn(sum(counts), d, generator=g)
    was = [cpu_kernels.set_prefetch(True, many) for many in (False, True)]
    try:
        with_it = cpu_kernels.swiglu(x, counts, w13, w2, f)
        assert cpu_kernels.tile_rows() in (4, 8)  # AVX2, AVX-512
        mm_with_it = cpu_kernels.mm(x, w13[0], 2 * f)  # 11 rows: more than a tile
        assert cpu_kernels.set_prefetch(False) is True  # the few-rows regime
        assert cpu_kernels.set_prefetch(False, many=True) is True  # the other one, apart
        assert cpu_kernels.set_prefetch(False, many=True) is False
        assert torch.equal(cpu_kernels.swiglu(x, counts, w13, w2, f), with_it)
        assert torch.equal(cpu_kernels.mm(x, w13[0], 2 * f), mm_with_it)
        few, many = prefetch.tune(weights, calls=1)
        assert cpu_kernels.set_prefetch(few) is few
        assert cpu_kernels.set_prefetch(many, many=True) is many
        assert prefetch.tune(ExpertWeights(torch.zeros(0), torch.zeros(0))) is None  # unpacked
    finally:
        for many, on in zip((False, True), was, strict=True):
            cpu_kernels.set_prefetch(on, many)


@pytest.mark.parametrize(
    ("with_s", "without_s", "keep"),
    [
        ([1.0] * 7, [0.9] * 7, False),  # without wins every turn, by 10%: drop it
        ([1.0] * 7, [0.99] * 7, True),  # wins every turn, by 1%: not worth the risk
        ([1.0] * 7, [0.9] * 3 + [1.1] * 4, True),  # wins only 3 of 7 turns
        ([1.0] * 7, [1.2] * 7, True),  # with it is faster
    ],
)
def test_prefetch_is_dropped_only_when_clearly_slower(with_s, without_s, keep):
    from experts.prefetch import prefetch_pays

    assert prefetch_pays(with_s, without_s) is keep


@pytest.mark.parametrize(
    ("tokens", "heads", "kv_heads", "head_dim"), [(16, 8, 2, 64), (5, 4, 4, 36)]
)
def test_rope_in_place_is_apply_ropes_bits_on_q_and_k_only(tokens, heads, kv_heads, head_dim):
    from serving.engine.attention import apply_rope, rope

    g = torch.Generator().manual_seed(tokens + head_dim)
    qkv = torch.randn(tokens, heads + 2 * kv_heads, head_dim, generator=g)
    cos, sin = rope(torch.randint(0, 4000, (tokens,), generator=g), head_dim, 1e6, torch.float32)
    q, k, v = qkv.split([heads, kv_heads, kv_heads], 1)
    want_q, want_k, want_v = apply_rope(q, cos, sin), apply_rope(k, cos, sin), v.clone()
    cpu_kernels.rope_(qkv, cos, sin, heads + kv_heads)
    assert torch.equal(q, want_q) and torch.equal(k, want_k)
    assert torch.equal(v, want_v)  # the value heads are left alone
