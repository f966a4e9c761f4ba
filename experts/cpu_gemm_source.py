"""C++ of the packed CPU GEMM (compiled and exposed by experts/cpu_kernels.py, which has the why).

Shape legend: M rows of x, K inputs, N outputs, NR columns per packed block, NB = ceil(N / NR).

The weight is packed once, at load, into blocks of NR columns laid out k-major, [NB, K, NR], so a
call streams it exactly once, front to back, while NR-wide vector accumulators for up to MR rows
stay in registers; rows beyond MR reuse the block from cache, and the next block streams in
evenly meanwhile. `swiglu` runs every expert of a layer in one call. Written against the vector
helpers of experts/cpu_kernels.py (`vec`, W floats wide, `vexp`).
"""

SOURCE = r"""
constexpr int V = NR / W;  // vectors per block row
constexpr int LINE = 64 / sizeof(float);  // floats per cache line
// Rows of a block read per pass when the block is reread for more than MR rows: 128 rows of
// NR floats (24 KiB with AVX-512) stay in the core's first-level cache for the next tile.
constexpr int64_t KC = 128;

// R rows of x (stride ldx) times rows k0..k1-1 of one packed block [K, NR] -> y (stride ldy),
// `cols` kept; `add`: onto what y holds (an earlier pass over k). Meanwhile `lines` cache lines
// from `ahead` are pulled towards the core, spread evenly over the pass.
template <int R>
static void tile(const float* x, int64_t ldx, const float* w, int64_t k0, int64_t k1, float* y,
                 int64_t ldy, int64_t cols, bool add, const float* ahead, int64_t lines) {
  vec acc[R][V];
  for (int r = 0; r < R; ++r) {
    alignas(64) float tmp[NR] = {};
    if (add) std::copy(y + r * ldy, y + r * ldy + cols, tmp);
    for (int v = 0; v < V; ++v) acc[r][v] = vload(tmp + v * W);
  }
  const int64_t n = k1 - k0;
  int64_t due = 0;  // Bresenham: `lines` prefetches over n iterations
  for (int64_t k = k0; k < k1; ++k) {
    for (due += lines; due >= n; due -= n, ahead += LINE)
      _mm_prefetch(reinterpret_cast<const char*>(ahead), _MM_HINT_T1);
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
static void tail(const float* x, int64_t ldx, const float* w, int64_t k0, int64_t k1, float* y,
                 int64_t ldy, int64_t cols, bool add, const float* ahead, int64_t lines,
                 int64_t left) {
  if constexpr (R > 0) {
    if (left == R) return tile<R>(x, ldx, w, k0, k1, y, ldy, cols, add, ahead, lines);
    return tail<R - 1>(x, ldx, w, k0, k1, y, ldy, cols, add, ahead, lines, left);
  }
}

// All M rows against one block, while the next block streams in. Every pass (a tile of rows
// over a range of k) prefetches an equal share of the next block: the memory stream then runs
// through the whole computation instead of in bursts that the tiles rereading this block from
// cache would wait behind (measured: 15-25% faster at 16-64 rows, scripts/bench_gemm.py).
// With more than MR rows the block is read in passes of KC rows of k, so that the tiles after
// the first reread it from the first-level cache. `ahead`: what streams next (nullptr: nothing).
static void block_rows(const float* x, int64_t ldx, const float* w, int64_t K, float* y,
                       int64_t ldy, int64_t M, int64_t cols, const float* ahead) {
  const int64_t tiles = (M + MR - 1) / MR, kc = tiles > 1 ? KC : K;
  const int64_t passes = tiles * ((K + kc - 1) / kc);
  // Lines of the next block per pass (as many as this block has: a prefetch is only a hint).
  const int64_t share = ahead ? (K * NR / LINE + passes - 1) / passes : 0;
  for (int64_t k0 = 0; k0 < K; k0 += kc) {
    const int64_t k1 = std::min(K, k0 + kc);
    for (int64_t m = 0; m < M; m += MR, ahead += share * LINE) {
      if (m + MR <= M)
        tile<MR>(x + m * ldx, ldx, w, k0, k1, y + m * ldy, ldy, cols, k0 > 0, ahead, share);
      else
        tail<MR - 1>(x + m * ldx, ldx, w, k0, k1, y + m * ldy, ldy, cols, k0 > 0, ahead, share,
                     M - m);
    }
  }
}

// Packed weights (and `huge_zeros`: the KV cache) on 2 MiB pages where the kernel allows it
// (Linux's transparent huge pages in "madvise" or "always" mode). A decode step streams every
// weight once; on 4 KiB pages the stream crosses a page, and the hardware prefetcher stops,
// every 4 KiB, and each page costs a translation. Measured on one machine: four layers' experts
// at 4 rows each 15.1 -> 12.9 ms, the whole decode step 6-7% faster (BENCHMARKS.md). Off: 4 KiB
// pages, as torch allocates them.
static bool g_huge_pages = true;

bool set_huge_pages(bool on) {  // returns the setting it replaces; applies to later calls
  const bool was = g_huge_pages;
  g_huge_pages = on;
  return was;
}

// An uninitialised float tensor, its pages advised huge (before anything touches them: a page
// is chosen at its first write). The advice is a hint; refused, the pages stay 4 KiB.
static torch::Tensor empty_huge(at::IntArrayRef sizes, const torch::TensorOptions& options) {
  constexpr int64_t HP = 2 << 20;
  int64_t bytes = sizeof(float);
  for (int64_t n : sizes) bytes *= n;
  if (!g_huge_pages || bytes < HP) return torch::empty(sizes, options);
  auto raw = torch::empty({bytes + HP}, options.dtype(torch::kByte));  // room to align
  const auto at = reinterpret_cast<uintptr_t>(raw.data_ptr());
  const int64_t skip = static_cast<int64_t>((HP - at % HP) % HP);
  madvise(reinterpret_cast<void*>(at + skip), bytes / HP * HP, MADV_HUGEPAGE);
  return raw.narrow(0, skip, bytes).view(torch::kFloat).view(sizes);
}

// Zeros of float32 on 2 MiB pages (the KV cache: a decode step reads every running slot's keys).
torch::Tensor huge_zeros(std::vector<int64_t> sizes) {
  return empty_huge(sizes, torch::TensorOptions().dtype(torch::kFloat)).zero_();
}

torch::Tensor pack(torch::Tensor w) {  // [N, K] -> [NB, K, NR], zero-padded columns
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kFloat, "pack: a 2-D float32 weight");
  int64_t N = w.size(0), K = w.size(1), NB = (N + NR - 1) / NR;
  auto padded = torch::zeros({NB * NR, K}, w.options());
  padded.narrow(0, 0, N).copy_(w);
  auto packed = empty_huge({NB, K, NR}, w.options());
  packed.copy_(padded.view({NB, NR, K}).transpose(1, 2));
  return packed;
}

torch::Tensor unpack(torch::Tensor p, int64_t N) {  // inverse of pack: [N, K]
  int64_t NB = p.size(0), K = p.size(1);
  return p.transpose(1, 2).reshape({NB * NR, K}).narrow(0, 0, N).contiguous();
}

// Whether blocks prefetch what streams next, for calls of at most MR rows (one tile: each block
// read once, bound by memory) and of more (tiles reread each block from cache: bound by
// arithmetic). Whether it pays depends on the machine and the regime (measured on one machine:
// 30% faster at 4 rows; on another 18% slower at 4 rows and 9% faster at 16), so
// experts/prefetch.py measures each at load.
static bool g_prefetch[2] = {true, true};  // [M <= MR, M > MR]

bool set_prefetch(bool on, bool many) {  // returns the setting it replaces
  const bool was = g_prefetch[many];
  g_prefetch[many] = on;
  return was;
}

int64_t tile_rows() { return MR; }  // rows one tile holds: the regimes' boundary

// y [M, N] (row stride ldy) = x [M, K] @ W.T for the weight packed in p. `next`: the weight
// the caller streams after this one, whose first block the last block pulls in meanwhile (else
// each call would begin with a block that nothing fetched ahead).
static void mm_into(const torch::Tensor& x, const torch::Tensor& p, int64_t N, float* yp,
                    int64_t ldy, const float* next = nullptr) {
  int64_t M = x.size(0), K = x.size(1), NB = p.size(0);
  TORCH_CHECK(p.size(1) == K && p.size(2) == NR, "mm: packed weight does not match x");
  if (M == 0) return;
  const float* xp = x.data_ptr<float>();
  const float* wp = p.data_ptr<float>();
  const bool ahead = g_prefetch[M > MR];
  at::parallel_for(0, NB, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      block_rows(xp, K, wp + b * K * NR, K, yp + b * NR, ldy, M, std::min<int64_t>(NR, N - b * NR),
                 !ahead ? nullptr : b + 1 < NB ? wp + (b + 1) * K * NR : next);
  });
}

// x [M, K] @ W.T -> [M, N]
torch::Tensor mm(torch::Tensor x, torch::Tensor p, int64_t N, const float* next = nullptr) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat, "mm: 2-D float32 rows");
  x = x.contiguous();
  auto y = torch::empty({x.size(0), N}, x.options());
  mm_into(x, p, N, y.data_ptr<float>(), N, next);
  return y;
}

static torch::Tensor mm_op(torch::Tensor x, torch::Tensor p, int64_t N) { return mm(x, p, N); }

// a [n, F] = silu(g) * u for h = [g | u] [n, 2F], silu(g) = g * sigmoid(g) from e^-|g| (in (0, 1]:
// never overflows). In the loop rather than torch's silu and mul: two operators, an allocation
// and a pass over h per expert cost ~15 us each at a decode step's few rows (measured).
static void silu_mul(const float* h, int64_t n, int64_t F, float* a) {
  const vec one = vset(1.0f), zero = vzero();
  for (int64_t r = 0; r < n; ++r) {
    const float* g = h + r * 2 * F;
    const float* u = g + F;
    float* o = a + r * F;
    int64_t f = 0;
    for (; f + W <= F; f += W) {
      const vec x = vload(g + f);
      const vec t = vexp(vsub(zero, vmax(x, vsub(zero, x))));  // e^-|x|
      const vec sig = vdiv(vwhere_nonneg(x, one, t), vadd(one, t));  // sigmoid(x)
      vstore(o + f, vmul(vmul(x, sig), vload(u + f)));
    }
    for (; f < F; ++f) o[f] = g[f] / (1.0f + std::exp(-g[f])) * u[f];
  }
}

// Every expert of a layer in one call: x [R, D] rows sorted by expert, counts[e] rows each;
// expert e computes w2 (silu(w1 x) * (w3 x)) with w13 [2F, D] (w1 rows first) and w2 [D, F]
// packed. One call instead of a dozen operators per expert from Python: [R, D].
torch::Tensor swiglu(torch::Tensor x, std::vector<int64_t> counts, std::vector<torch::Tensor> w13,
                     std::vector<torch::Tensor> w2, int64_t F) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat, "swiglu: 2-D float32 rows");
  TORCH_CHECK(counts.size() == w13.size() && counts.size() == w2.size(),
              "swiglu: one count and two weights per expert");
  x = x.contiguous();
  const int64_t D = x.size(1);
  auto out = torch::empty_like(x);
  auto next_w13 = [&](size_t e) -> const float* {  // the next expert with rows: its w13
    while (++e < counts.size() && counts[e] == 0) {}
    return e < counts.size() ? w13[e].data_ptr<float>() : nullptr;
  };
  int64_t start = 0;
  for (size_t e = 0; e < counts.size(); start += counts[e], ++e) {
    if (counts[e] == 0) continue;
    TORCH_CHECK(start + counts[e] <= x.size(0), "swiglu: counts exceed the rows");
    auto h = mm(x.narrow(0, start, counts[e]), w13[e], 2 * F, w2[e].data_ptr<float>());  // [n, 2F]
    auto a = torch::empty({counts[e], F}, x.options());  // [n, F]
    silu_mul(h.data_ptr<float>(), counts[e], F, a.data_ptr<float>());
    mm_into(a, w2[e], D, out.data_ptr<float>() + start * D, D, next_w13(e));
  }
  TORCH_CHECK(start == x.size(0), "swiglu: counts do not add up to the rows");
  return out;
}

"""
