"""A CPU GEMM for few rows against a weight packed once at load (fp32, AVX-512 or AVX2).

Shape legend: M rows of x, K inputs, N outputs, NR columns per packed block, NB = ceil(N / NR).

Why: a decode step multiplies a handful of rows by every weight of the model, so the step is
bound by reading the weights. The BLAS packs (copies) its operands on every call and, for few
rows, reaches a fraction of the memory bandwidth (scripts/bench_gemm.py, BENCHMARKS.md). Here the
weight is packed once, at load, into blocks of NR columns laid out k-major, [NB, K, NR], so a call
streams it exactly once, front to back, while NR-wide vector accumulators for up to MR rows stay
in registers; rows beyond MR reuse the block from cache.

The C++ source is compiled on first use with torch's extension builder (g++; about a minute,
cached per machine and instruction set). Where that cannot happen (no compiler, another CPU
architecture), `available()` is False and callers keep torch's own GEMM.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import shutil
import sys

import torch

log = logging.getLogger(__name__)

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>

#if defined(__AVX512F__)
  using vec = __m512;
  constexpr int W = 16, NR = 48, MR = 8;  // 24 accumulators of 32 registers
  static inline vec vzero() { return _mm512_setzero_ps(); }
  static inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
  static inline vec vbcast(const float* p) { return _mm512_set1_ps(*p); }
  static inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
  static inline void vstore(float* p, vec v) { _mm512_storeu_ps(p, v); }
#else
  using vec = __m256;
  constexpr int W = 8, NR = 24, MR = 4;  // 12 accumulators of 16 registers
  static inline vec vzero() { return _mm256_setzero_ps(); }
  static inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
  static inline vec vbcast(const float* p) { return _mm256_broadcast_ss(p); }
  static inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
  static inline void vstore(float* p, vec v) { _mm256_storeu_ps(p, v); }
#endif
constexpr int V = NR / W;  // vectors per block row
constexpr int64_t LOOKAHEAD = 512 * 1024;  // bytes of weight prefetched ahead, at most

// R rows of x (stride ldx) times one packed block [K, NR] -> y (stride ldy), `cols` kept.
template <int R>
static void tile(const float* x, int64_t ldx, const float* w, int64_t K, float* y, int64_t ldy,
                 int64_t cols, const float* ahead) {
  vec acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = vzero();
  for (int64_t k = 0; k < K; ++k) {
    // Ask for the weight PREFETCH floats ahead (the next block once this one ends): without
    // it the memory stream and the arithmetic take turns instead of overlapping.
    // Pull a later block's row k towards the core while this one computes (the arithmetic and
    // the memory stream overlap instead of taking turns); every cache line of the row.
    for (int v = 0; v < V; ++v)
      _mm_prefetch(reinterpret_cast<const char*>(ahead + k * NR + v * W), _MM_HINT_T1);
    vec b[V];
    for (int v = 0; v < V; ++v) b[v] = vload(w + k * NR + v * W);
    for (int r = 0; r < R; ++r) {
      vec a = vbcast(x + r * ldx + k);
      for (int v = 0; v < V; ++v) acc[r][v] = vfma(a, b[v], acc[r][v]);
    }
  }
  for (int r = 0; r < R; ++r) {
    if (cols == NR) {
      for (int v = 0; v < V; ++v) vstore(y + r * ldy + v * W, acc[r][v]);
    } else {
      alignas(64) float tmp[NR];
      for (int v = 0; v < V; ++v) vstore(tmp + v * W, acc[r][v]);
      std::copy(tmp, tmp + cols, y + r * ldy);
    }
  }
}

template <int R>
static void tail(const float* x, int64_t ldx, const float* w, int64_t K, float* y, int64_t ldy,
                 int64_t cols, const float* ahead, int64_t left) {
  if constexpr (R > 0) {
    if (left == R) return tile<R>(x, ldx, w, K, y, ldy, cols, ahead);
    return tail<R - 1>(x, ldx, w, K, y, ldy, cols, ahead, left);
  }
}

// All M rows against one block. The t-th tile of rows prefetches block t + 1 ahead: the next
// block is on its way during the first tile, and the tiles that reread this block from cache
// keep the memory stream busy with later ones. (Prefetching past the end is harmless.)
static void block_rows(const float* x, int64_t ldx, const float* w, int64_t K, float* y,
                       int64_t ldy, int64_t M, int64_t cols) {
  // At most LOOKAHEAD bytes ahead: further, the prefetched blocks would push each other (and
  // the one being reread) out of the core's cache.
  const int64_t block = K * NR, most = std::max<int64_t>(1, LOOKAHEAD / (block * 4));
  int64_t m = 0, t = 0;
  for (; m + MR <= M; m += MR, ++t)
    tile<MR>(x + m * ldx, ldx, w, K, y + m * ldy, ldy, cols, w + std::min(t + 1, most) * block);
  if (m < M)
    tail<MR - 1>(x + m * ldx, ldx, w, K, y + m * ldy, ldy, cols,
                 w + std::min(t + 1, most) * block, M - m);
}

torch::Tensor pack(torch::Tensor w) {  // [N, K] -> [NB, K, NR], zero-padded columns
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kFloat, "pack: a 2-D float32 weight");
  int64_t N = w.size(0), K = w.size(1), NB = (N + NR - 1) / NR;
  auto padded = torch::zeros({NB * NR, K}, w.options());
  padded.narrow(0, 0, N).copy_(w);
  return padded.view({NB, NR, K}).transpose(1, 2).contiguous();
}

torch::Tensor unpack(torch::Tensor p, int64_t N) {  // inverse of pack: [N, K]
  int64_t NB = p.size(0), K = p.size(1);
  return p.transpose(1, 2).reshape({NB * NR, K}).narrow(0, 0, N).contiguous();
}

torch::Tensor mm(torch::Tensor x, torch::Tensor p, int64_t N) {  // x [M, K] @ W.T -> [M, N]
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat, "mm: 2-D float32 rows");
  x = x.contiguous();
  int64_t M = x.size(0), K = x.size(1), NB = p.size(0);
  TORCH_CHECK(p.size(1) == K && p.size(2) == NR, "mm: packed weight does not match x");
  auto y = torch::empty({M, N}, x.options());
  if (M == 0) return y;
  const float* xp = x.data_ptr<float>();
  const float* wp = p.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, NB, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      block_rows(xp, K, wp + b * K * NR, K, yp + b * NR, N, M, std::min<int64_t>(NR, N - b * NR));
  });
  return y;
}

// Registered as torch operators (torch.ops.moe_serve.*): the profiler then names them.
TORCH_LIBRARY(moe_serve, m) {
  m.def("pack(Tensor w) -> Tensor", &pack);
  m.def("unpack(Tensor p, int n) -> Tensor", &unpack);
  m.def("mm(Tensor x, Tensor p, int n) -> Tensor", &mm);
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
        load_inline(f"moe_serve_cpu_gemm_{isa}", cpp_sources=_SOURCE, extra_cflags=flags,
                    is_python_module=False, verbose=False)  # fmt: skip
        return torch.ops.moe_serve
    except Exception as exc:  # no compiler or headers: torch's GEMM serves instead
        log.warning("the packed CPU GEMM could not be built (%s); using torch's", exc)
        return None


def _ninja_on_path() -> None:
    """torch's builder runs `ninja` from PATH; the one pip installed (pyproject.toml) sits beside
    this Python, which a caller may have started without activating its environment."""
    if shutil.which("ninja") is None:
        here = os.path.dirname(sys.executable)
        os.environ["PATH"] = here + os.pathsep + os.environ.get("PATH", "")


def _isa() -> str | None:
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
