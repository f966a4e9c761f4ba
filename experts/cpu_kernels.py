"""The CPU kernels a step runs in C++ (fp32, AVX-512 or AVX2), built once as one extension:

- `mm`, `swiglu`: a GEMM for few rows against a weight packed once at load
  (experts/cpu_gemm_source.py). A decode step multiplies a handful of rows by every weight of
  the model, so the step is bound by reading the weights; the BLAS packs (copies) its operands on
  every call and, for few rows, reaches a fraction of the memory bandwidth (scripts/bench_gemm.py,
  BENCHMARKS.md). Here each weight streams exactly once per call, front to back.
- `decode_attention`, `first_max`, `rms_norm`, `rope_`, `kv_write`: every decode row's attention
  over its own live keys in the KV cache, the greedy pick over the step's logits, RMSNorm, RoPE
  and the cache write, each one pass where torch takes several operators
  (experts/cpu_decode_source.py).
- `top_k_gating`, `group_by_slot`, `combine_add`: the MoE layer's steps around the experts, each
  one call where torch takes several operators (experts/cpu_moe_source.py).

The C++ source is compiled on first use with torch's extension builder (g++; about a minute,
cached per machine and instruction set). Where that cannot happen (no compiler, another CPU
architecture), `available()` is False and callers keep torch's own operators.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import shutil
import sys

import torch

from experts import cpu_decode_source, cpu_gemm_source, cpu_moe_source

log = logging.getLogger(__name__)

_VECTORS = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <sys/mman.h>
#include <algorithm>
#include <cmath>
#include <vector>

#if defined(__AVX512F__)
  using vec = __m512;
  constexpr int W = 16, NR = 48, MR = 8;  // 24 accumulators of 32 registers
  static inline vec vzero() { return _mm512_setzero_ps(); }
  static inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
  static inline vec vbcast(const float* p) { return _mm512_set1_ps(*p); }
  static inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
  static inline void vstore(float* p, vec v) { _mm512_storeu_ps(p, v); }
  static inline vec vset(float f) { return _mm512_set1_ps(f); }
  static inline vec vadd(vec a, vec b) { return _mm512_add_ps(a, b); }
  static inline vec vsub(vec a, vec b) { return _mm512_sub_ps(a, b); }
  static inline vec vmul(vec a, vec b) { return _mm512_mul_ps(a, b); }
  static inline vec vmax(vec a, vec b) { return _mm512_max_ps(a, b); }
  static inline float vsum(vec a) { return _mm512_reduce_add_ps(a); }
  static inline float vhmax(vec a) { return _mm512_reduce_max_ps(a); }
  static inline vec vfloor(vec a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC); }
  static inline vec vpow2(vec y, vec n) { return _mm512_scalef_ps(y, n); }  // y * 2^n
  static inline vec vdiv(vec a, vec b) { return _mm512_div_ps(a, b); }
  static inline vec vwhere_nonneg(vec x, vec a, vec b) {  // a where x >= 0, else b (and NaN)
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_GE_OQ), b, a);
  }
#else
  using vec = __m256;
  constexpr int W = 8, NR = 24, MR = 4;  // 12 accumulators of 16 registers
  static inline vec vzero() { return _mm256_setzero_ps(); }
  static inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
  static inline vec vbcast(const float* p) { return _mm256_broadcast_ss(p); }
  static inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
  static inline void vstore(float* p, vec v) { _mm256_storeu_ps(p, v); }
  static inline vec vset(float f) { return _mm256_set1_ps(f); }
  static inline vec vadd(vec a, vec b) { return _mm256_add_ps(a, b); }
  static inline vec vsub(vec a, vec b) { return _mm256_sub_ps(a, b); }
  static inline vec vmul(vec a, vec b) { return _mm256_mul_ps(a, b); }
  static inline vec vmax(vec a, vec b) { return _mm256_max_ps(a, b); }
  static inline float vsum(vec a) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
  }
  static inline float vhmax(vec a) {
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
  }
  static inline vec vfloor(vec a) { return _mm256_floor_ps(a); }
  static inline vec vpow2(vec y, vec n) {  // y * 2^n for integral n >= -126
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
  }
  static inline vec vdiv(vec a, vec b) { return _mm256_div_ps(a, b); }
  static inline vec vwhere_nonneg(vec x, vec a, vec b) {  // a where x >= 0, else b (and NaN)
    return _mm256_blendv_ps(b, a, _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_GE_OQ));
  }
#endif

// e^x for x <= 0 (scores less their maximum, -|x|), Cephes' polynomial: relative error ~1e-7. A
// NaN stays NaN (vmax returns its second operand when either is NaN), as in torch.
static inline vec vexp(vec x) {
  x = vmax(vset(-87.3f), x);  // below: e^x underflows to 0 anyway
  vec n = vfloor(vfma(x, vset(1.44269504f), vset(0.5f)));  // x = n ln2 + r
  vec r = vfma(n, vset(-0.693359375f), x);
  r = vfma(n, vset(2.12194440e-4f), r);
  vec p = vset(1.9875691500e-4f);
  p = vfma(p, r, vset(1.3981999507e-3f));
  p = vfma(p, r, vset(8.3334519073e-3f));
  p = vfma(p, r, vset(4.1665795894e-2f));
  p = vfma(p, r, vset(1.6666665459e-1f));
  p = vfma(p, r, vset(5.0000001201e-1f));
  p = vfma(p, vmul(r, r), vadd(r, vset(1.0f)));
  return vpow2(p, n);
}
"""

_REGISTRATION = r"""
int64_t threads_used(int64_t n) {
  std::vector<char> seen(at::get_num_threads(), 0);
  at::parallel_for(0, n, 1, [&](int64_t, int64_t) { seen[at::get_thread_num()] = 1; });
  return std::count(seen.begin(), seen.end(), 1);
}

// Registered as torch operators (torch.ops.moe_serve.*): the profiler then names them.
TORCH_LIBRARY(moe_serve, m) {
  m.def("pack(Tensor w) -> Tensor", &pack);
  m.def("unpack(Tensor p, int n) -> Tensor", &unpack);
  m.def("mm(Tensor x, Tensor p, int n) -> Tensor", &mm_op);
  m.def("threads_used(int n) -> int", &threads_used);
  m.def("set_prefetch(bool on, bool many) -> bool", &set_prefetch);
  m.def("tile_rows() -> int", &tile_rows);
  m.def("set_huge_pages(bool on) -> bool", &set_huge_pages);
  m.def("huge_zeros(int[] size) -> Tensor", &huge_zeros);
  m.def("swiglu(Tensor x, int[] counts, Tensor[] w13, Tensor[] w2, int f) -> Tensor", &swiglu);
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor slots, Tensor pos, int window, "
        "float scale) -> Tensor", &decode_attention);
  m.def("first_max(Tensor x) -> Tensor", &first_max);
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor", &rms_norm);
  m.def("kv_write(Tensor(a!) cache, Tensor slots, Tensor positions, Tensor src) -> ()", &kv_write);
  m.def("rope_(Tensor(a!) x, Tensor cos, Tensor sin, int heads) -> ()", &rope_);
  m.def("top_k_gating(Tensor logits, int k) -> Tensor[]", &top_k_gating);
  m.def("group_by_slot(Tensor slots, int num_slots) -> Tensor[]", &group_by_slot);
  m.def("combine_add(Tensor h, Tensor y, Tensor pair_idx, Tensor weights) -> Tensor",
        &combine_add);
}
"""


@functools.cache
def _module():
    """The compiled extension, or None where it cannot be built here."""
    isa = _isa()
    if isa is None:
        return None
    try:
        from torch.utils.cpp_extension import load_inline

        _ninja_on_path()

        flags = ["-O3", "-mavx512f", "-mfma"] if isa == "avx512" else ["-O3", "-mavx2", "-mfma"]
        # A multiply and an add stay two roundings, as in torch (combine_add matches router's
        # combine bit for bit); FMAs are written out where a kernel wants them.
        flags.append("-ffp-contract=off")
        # at::parallel_for is OpenMP in torch's CPU builds, inlined from its header: without
        # -fopenmp here its pragma is dropped and every call runs on one thread, whatever
        # torch.set_num_threads says.
        parallel = ["-fopenmp"] if torch.backends.openmp.is_available() else []
        source = "\n".join((_VECTORS, cpu_gemm_source.SOURCE, cpu_decode_source.SOURCE,
                             cpu_moe_source.SOURCE, _REGISTRATION))  # fmt: skip
        load_inline(f"moe_serve_cpu_gemm_{isa}", cpp_sources=source,
                    extra_cflags=flags + parallel, extra_ldflags=parallel,
                    is_python_module=False, verbose=False)  # fmt: skip
        return torch.ops.moe_serve
    except Exception as exc:  # no compiler or headers: torch's GEMM serves instead
        log.warning("the CPU kernels could not be built (%s); using torch's operators", exc)
        return None


def _ninja_on_path() -> None:
    """torch's builder runs `ninja` from PATH; the one pip installed (pyproject.toml) sits beside
    this Python, which a caller may have started without activating its environment."""
    if shutil.which("ninja") is None:
        here = os.path.dirname(sys.executable)
        os.environ["PATH"] = here + os.pathsep + os.environ.get("PATH", "")


@functools.cache
def _isa() -> str | None:
    """The vector instruction set the kernels are built for here (read once: /proc/cpuinfo)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return None
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return None
    if " avx512f" in flags:
        return "avx512"
    if " avx2" in flags and " fma" in flags:
        return "avx2"
    return None


def available() -> bool:
    return _module() is not None


def pack(w: torch.Tensor) -> torch.Tensor:
    """w [N, K] float32 -> packed [NB, K, NR]."""
    return _module().pack(w)


def unpack(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Packed [NB, K, NR] -> the [N, K] weight it was packed from."""
    return _module().unpack(packed, n)


def mm(x: torch.Tensor, packed: torch.Tensor, n: int) -> torch.Tensor:
    """x [M, K] float32 -> x @ w.T [M, N] for the weight w [N, K] packed in `packed`."""
    return _module().mm(x, packed, n)


def set_prefetch(on: bool, many: bool = False) -> bool:
    """Whether `mm` and `swiglu` prefetch the weight that streams next, in calls of at most
    `tile_rows()` rows (many=False) or of more (many=True); the same results either way
    (experts/prefetch.py measures which is faster here). Returns the setting it replaces."""
    return _module().set_prefetch(on, many)


def set_huge_pages(on: bool) -> bool:
    """Whether `pack` and `zeros` put their memory on 2 MiB pages where the OS allows (the
    default: a weight streams faster without a page boundary every 4 KiB); applies to later
    calls. Returns the setting it replaces."""
    return _module().set_huge_pages(on)


def zeros(shape: tuple[int, ...]) -> torch.Tensor:
    """float32 zeros on a CPU, on 2 MiB pages as `pack`'s weights (see `set_huge_pages`)."""
    return _module().huge_zeros(list(shape))


def tile_rows() -> int:
    """Rows the kernel holds in registers at once (8 with AVX-512, 4 with AVX2): a call with
    more rereads every weight block from cache, and is bound by arithmetic, not memory."""
    return _module().tile_rows()


def threads_used(n: int) -> int:
    """How many of torch's threads the kernel's parallel loop uses for n blocks."""
    return _module().threads_used(n)


def swiglu(
    x: torch.Tensor, counts: list[int], w13: list[torch.Tensor], w2: list[torch.Tensor], f: int
) -> torch.Tensor:
    """Experts over expert-sorted rows in one call: x [R, D], counts [E] rows per expert, packed
    w13 [2F, D] and w2 [D, F] per expert -> [R, D] (experts/ffn.py has the math)."""
    return _module().swiglu(x, counts, w13, w2, f)


def decode_attention_fits(head_dim: int) -> bool:
    """Whether `decode_attention` takes heads of this size: whole vectors, at most 16 of them."""
    width = 16 if _isa() == "avx512" else 8
    return available() and head_dim % width == 0 and head_dim <= 16 * width


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slots: torch.Tensor,
    positions: torch.Tensor,
    window: int | None,
    scale: float,
) -> torch.Tensor:
    """Decode rows against their own slots' live keys, in place in the cache: q [D, H, Dh], one
    layer's k and v [S, G, M, Dh], slots and positions [D] -> [D, H, Dh]; row d attends to keys
    0..positions[d] of slot slots[d] (the last `window` of them with a sliding window)."""
    return _module().decode_attention(q, k, v, slots, positions, window or 0, scale)


def first_max(x: torch.Tensor) -> torch.Tensor:
    """x [B, V] float32 -> the index of each row's first maximum [B] (int64), as torch's
    max(dim).indices: a NaN wins at its first place."""
    return _module().first_max(x)


def fits(*tensors: torch.Tensor) -> bool:
    """Whether the kernels take these tensors: float32 on a CPU that built them."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors) and available()


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., D] float32 -> w * (x * rsqrt(mean(x^2) + eps)), Mixtral's RMSNorm."""
    return _module().rms_norm(x.reshape(-1, x.shape[-1]), w, eps).view(x.shape)


def kv_write(cache: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor,
             src: torch.Tensor) -> None:  # fmt: skip
    """One layer's cache [S, G, M, Dh] at (slots[t], :, positions[t]) = src [T, G, Dh]."""
    _module().kv_write(cache, slots, positions, src)


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int) -> None:
    """RoPE in place on the first `heads` heads of x [T, NH, Dh] (contiguous), cos and sin
    [T, 1, Dh]: serving/engine/attention.py `apply_rope`, bit for bit."""
    _module().rope_(x, cos, sin, heads)


def top_k_gating(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """router_logits [T, E] float32 -> (weights [T, K], experts [T, K], probs [T, E]), as
    router/gating.py `top_k_gating` computes them."""
    weights, experts, probs = _module().top_k_gating(logits, k)
    return weights, experts, probs


def group_by_slot(
    slots: torch.Tensor, num_slots: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """slots [T, K] (-1: dropped) -> (pair_idx [N], token_idx [N], counts [S]), as
    router/dispatch.py `group_by_slot` computes them."""
    pair_idx, token_idx, counts = _module().group_by_slot(slots, num_slots)
    return pair_idx, token_idx, counts


def combine_add(
    h: torch.Tensor, y: torch.Tensor, pair_idx: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """h [T, D] + router/dispatch.py `combine(y [N, D], pair_idx [N], weights [T, K])`, float32."""
    return _module().combine_add(h, y, pair_idx, weights)
