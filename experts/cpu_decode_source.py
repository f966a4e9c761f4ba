"""C++ of the decode step's other CPU kernels (compiled and exposed by experts/cpu_kernels.py):
attention of every decode row over its own slot of the KV cache, the greedy pick, RMSNorm and
the KV cache write.

Shape legend: D decode rows, H query heads, G key/value heads, HQ = H / G query heads per
key/value head, Dh head size, S cache slots, M cache capacity per slot, L keys a row attends to,
B rows, V vocabulary.

Why: at a decode step every row attends to its own keys, of its own length. Through SDPA that
needs the rows' keys gathered (or viewed) up to the longest row and a mask for the shorter, and
SDPA's CPU path is built for many queries, not one; here each row reads only its live keys, in
place. The greedy pick reads the step's logits once with vectors, then finds the first maximum
in a row that is now in cache. Written against the vector helpers of experts/cpu_kernels.py
(`vec`, W floats wide, `vexp`).
"""

SOURCE = r"""
// softmax numerators of s[0..L) in place (e^(s - max)); returns their sum.
static float exp_shifted(float* s, int64_t L) {
  float mx = -INFINITY;
  for (int64_t l = 0; l < L; ++l) mx = std::max(mx, s[l]);  // keeps a NaN out of the shift only
  const vec m = vset(mx);
  vec acc = vzero();
  int64_t l = 0;
  for (; l + W <= L; l += W) {
    vec e = vexp(vsub(vload(s + l), m));
    vstore(s + l, e);
    acc = vadd(acc, e);
  }
  float sum = vsum(acc);
  for (; l < L; ++l) sum += (s[l] = std::exp(s[l] - mx));
  return sum;
}

// The sums of four vectors, into out[0..4): one tree for the four (about a third of the
// shuffles of four separate reductions), the heads of a group scoring one key together.
static inline void vsum4(vec a, vec b, vec c, vec d, float* out) {
#if defined(__AVX512F__)
  // 512 -> 256 bits: [a's 8 partials | b's 8 partials], likewise c and d.
  const vec ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  const vec cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xEE));
  // -> 128 bits each: [a's 4 | b's 4 | c's 4 | d's 4].
  const vec x = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD));
  const __m128 q0 = _mm512_castps512_ps128(x), q1 = _mm512_extractf32x4_ps(x, 1);
  const __m128 q2 = _mm512_extractf32x4_ps(x, 2), q3 = _mm512_extractf32x4_ps(x, 3);
  // 4 x 4 partials -> 4 sums: two horizontal adds.
  _mm_storeu_ps(out, _mm_hadd_ps(_mm_hadd_ps(q0, q1), _mm_hadd_ps(q2, q3)));
#else
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));  // per 128 lane
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
#endif
}

// One (row, key/value head) pair: the HQ query heads that share the head, against keys and
// values [L, Dh] (contiguous), scores in s [HQ, L]. Dh = DV * W. Each key and value is read
// once for all HQ heads (four heads share one in Mixtral), not once per head.
template <int DV, int HQ>
static void attend_group(const float* q, const float* k, const float* v, int64_t L, float scale,
                         float* s, float* out) {
  vec qh[HQ][DV];
  for (int h = 0; h < HQ; ++h)
    for (int j = 0; j < DV; ++j) qh[h][j] = vmul(vload(q + h * DV * W + j * W), vset(scale));
  for (int64_t l = 0; l < L; ++l) {
    const float* kl = k + l * DV * W;
    vec kv[DV];
    for (int j = 0; j < DV; ++j) kv[j] = vload(kl + j * W);
    vec acc[HQ];
    for (int h = 0; h < HQ; ++h) {
      acc[h] = vmul(qh[h][0], kv[0]);
      for (int j = 1; j < DV; ++j) acc[h] = vfma(qh[h][j], kv[j], acc[h]);
    }
    if constexpr (HQ == 4) {
      alignas(16) float t[4];
      vsum4(acc[0], acc[1], acc[2], acc[3], t);
      for (int h = 0; h < 4; ++h) s[h * L + l] = t[h];
    } else {
      for (int h = 0; h < HQ; ++h) s[h * L + l] = vsum(acc[h]);
    }
  }
  float inv[HQ];
  for (int h = 0; h < HQ; ++h) inv[h] = 1.0f / exp_shifted(s + h * L, L);
  vec o[HQ][DV];
  for (int h = 0; h < HQ; ++h)
    for (int j = 0; j < DV; ++j) o[h][j] = vzero();
  for (int64_t l = 0; l < L; ++l) {
    const float* vl = v + l * DV * W;
    vec vv[DV];
    for (int j = 0; j < DV; ++j) vv[j] = vload(vl + j * W);
    for (int h = 0; h < HQ; ++h) {
      const vec p = vset(s[h * L + l]);
      for (int j = 0; j < DV; ++j) o[h][j] = vfma(p, vv[j], o[h][j]);
    }
  }
  for (int h = 0; h < HQ; ++h)
    for (int j = 0; j < DV; ++j) vstore(out + h * DV * W + j * W, vmul(o[h][j], vset(inv[h])));
}

// Any group size and head size: heads HQ at a time in groups of 4, then one by one.
template <int DV>
static void attend_heads(const float* q, const float* k, const float* v, int64_t L, int64_t HQ,
                         float scale, float* s, float* out) {
  int64_t h = 0;
  if constexpr (DV <= 4) {  // 4 heads x DV accumulators, DV keys and q's 4 x DV: in registers
    for (; h + 4 <= HQ; h += 4)
      attend_group<DV, 4>(q + h * DV * W, k, v, L, scale, s + h * L, out + h * DV * W);
  }
  for (; h < HQ; ++h)
    attend_group<DV, 1>(q + h * DV * W, k, v, L, scale, s + h * L, out + h * DV * W);
}

// Every decode row at once, straight from the cache: q [D, H, Dh] (row d's new token at
// position pos[d] of cache slot slots[d]); k, v one layer of the cache [S, G, M, Dh]; each row
// attends to keys 0..pos[d] of its slot (the last `window` of them when window > 0) -> [D, H, Dh].
// No mask, no gather: each row reads only its own live keys, in place.
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                               torch::Tensor slots, torch::Tensor pos, int64_t window,
                               double scale) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 4 && v.sizes() == k.sizes(), "decode_attention: q [D, H, Dh], k and v [S, G, M, Dh]");
  TORCH_CHECK(q.scalar_type() == torch::kFloat && k.scalar_type() == torch::kFloat && v.scalar_type() == torch::kFloat, "decode_attention: float32");
  q = q.contiguous();
  const int64_t D = q.size(0), H = q.size(1), Dh = q.size(2), G = k.size(1), M = k.size(2);
  TORCH_CHECK(k.size(3) == Dh && H % G == 0 && Dh % W == 0 && Dh / W <= 16, "decode_attention: head sizes");
  TORCH_CHECK(k.stride(3) == 1 && k.stride(2) == Dh && v.strides() == k.strides(), "decode_attention: each head's keys and values contiguous, laid out alike");
  auto sl = slots.to(torch::kLong).contiguous(), ps = pos.to(torch::kLong).contiguous();
  TORCH_CHECK(sl.numel() == D && ps.numel() == D, "decode_attention: one slot and position per row");
  const int64_t* slp = sl.data_ptr<int64_t>();
  const int64_t* psp = ps.data_ptr<int64_t>();
  for (int64_t d = 0; d < D; ++d)
    TORCH_CHECK(slp[d] >= 0 && slp[d] < k.size(0) && psp[d] >= 0 && psp[d] < M, "decode_attention: slot or position outside the cache");
  auto out = torch::empty_like(q);
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t HQ = H / G;
  at::parallel_for(0, D * G, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> s;
    for (int64_t i = i0; i < i1; ++i) {  // i: row d = i / G, its key/value head g = i % G
      const int64_t d = i / G, g = i % G, end = psp[d] + 1;
      const int64_t start = window > 0 ? std::max<int64_t>(0, end - window) : 0, L = end - start;
      s.resize(HQ * L);
      const int64_t off = slp[d] * k.stride(0) + g * k.stride(1) + start * Dh;
      const float *kg = kp + off, *vg = vp + off, *qg = qp + i * HQ * Dh;  // heads g*HQ ..
      float* og = op + i * HQ * Dh;
      const float sc = static_cast<float>(scale);
      switch (Dh / W) {
#define CASE(n) case n: attend_heads<n>(qg, kg, vg, L, HQ, sc, s.data(), og); break;
        CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
        CASE(9) CASE(10) CASE(11) CASE(12) CASE(13) CASE(14) CASE(15) CASE(16)
#undef CASE
      }
    }
  });
  return out;
}

// x [B, V] -> the index of each row's first maximum [B]; a NaN wins at its first place, as
// torch's max(dim) (and argmax) pick it. One pass finds the maximum with vectors, a second
// (over a row now in cache) its first place: 2-3x faster than torch's max(dim) from memory.
torch::Tensor first_max(torch::Tensor x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat, "first_max: 2-D float32 rows");
  x = x.contiguous();
  const int64_t B = x.size(0), V = x.size(1);
  TORCH_CHECK(V > 0, "first_max: empty rows");
  auto out = torch::empty({B}, x.options().dtype(torch::kLong));
  const float* xp = x.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float* row = xp + b * V;
      vec m = vset(-INFINITY), odd = vzero();  // odd: r - r, NaN where r is NaN or infinite
      int64_t j = 0;
      for (; j + W <= V; j += W) {
        const vec r = vload(row + j);
        m = vmax(m, r);
        odd = vadd(odd, vsub(r, r));
      }
      float best = vhmax(m);
      bool finite = vsum(odd) == 0.0f;
      for (; j < V; ++j) {
        finite &= std::isfinite(row[j]);
        best = std::max(best, row[j]);
      }
      int64_t at = 0;
      if (finite) {
        while (row[at] != best) ++at;
      } else {  // a NaN wins at its first place; else the first of the largest (maybe +-inf)
        float top = row[0];
        for (int64_t i = 0; i < V; ++i) {
          if (row[i] != row[i]) { at = i; break; }
          if (row[i] > top) { top = row[i]; at = i; }
        }
      }
      op[b] = at;
    }
  });
  return out;
}

// y [T, D] = w * (x * rsqrt(mean(x^2) + eps)) row by row: Mixtral's RMSNorm in float32, one
// pass instead of six operators (pow, mean, add, rsqrt, mul, mul) per norm.
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && w.scalar_type() == torch::kFloat
              && w.dim() == 1 && w.size(0) == x.size(1), "rms_norm: x [T, D] and w [D], float32");
  x = x.contiguous();
  w = w.contiguous();
  const int64_t T = x.size(0), D = x.size(1);
  auto y = torch::empty_like(x);
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float* r = xp + t * D;
      float* o = yp + t * D;
      vec acc = vzero();
      int64_t d = 0;
      for (; d + W <= D; d += W) acc = vfma(vload(r + d), vload(r + d), acc);
      float ss = vsum(acc);
      for (; d < D; ++d) ss += r[d] * r[d];
      const float scale = 1.0f / std::sqrt(ss / static_cast<float>(D) + static_cast<float>(eps));
      const vec s = vset(scale);
      for (d = 0; d + W <= D; d += W) vstore(o + d, vmul(vload(wp + d), vmul(vload(r + d), s)));
      for (; d < D; ++d) o[d] = wp[d] * (r[d] * scale);
    }
  });
  return y;
}

// RoPE in place on the first `heads` heads of every token: x [T, NH, Dh] (the fused q, k, v
// projection's output), cos and sin [T, 1, Dh] (halves repeated). As serving/engine/attention.py
// apply_rope, bit for bit: x * cos + rotate_half(x) * sin, each product rounded, then the sum.
void rope_(torch::Tensor x, torch::Tensor cos, torch::Tensor sin, int64_t heads) {
  TORCH_CHECK(x.dim() == 3 && x.is_contiguous() && x.scalar_type() == torch::kFloat,
              "rope_: a contiguous float32 x [T, heads, Dh]");
  const int64_t T = x.size(0), NH = x.size(1), Dh = x.size(2), h = Dh / 2;
  TORCH_CHECK(heads >= 0 && heads <= NH && Dh % 2 == 0, "rope_: heads within x, Dh even");
  cos = cos.contiguous();
  sin = sin.contiguous();
  TORCH_CHECK(cos.numel() == T * Dh && sin.numel() == T * Dh && cos.scalar_type() == torch::kFloat
              && sin.scalar_type() == torch::kFloat, "rope_: cos and sin [T, 1, Dh] float32");
  float* xp = x.data_ptr<float>();
  const float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t) {
    const float *c = cp + t * Dh, *s = sp + t * Dh;
    for (int64_t n = 0; n < heads; ++n) {
      float* r = xp + (t * NH + n) * Dh;
      int64_t d = 0;
      for (; d + W <= h; d += W) {
        const vec a = vload(r + d), b = vload(r + h + d);  // the halves, both read first
        vstore(r + d, vsub(vmul(a, vload(c + d)), vmul(b, vload(s + d))));
        vstore(r + h + d, vadd(vmul(b, vload(c + h + d)), vmul(a, vload(s + h + d))));
      }
      for (; d < h; ++d) {
        const float a = r[d], b = r[h + d];
        r[d] = a * c[d] - b * s[d];
        r[h + d] = b * c[h + d] + a * s[h + d];
      }
    }
  }
}

// One layer's cache [S, G, M, Dh] at (slots[t], :, positions[t]) = src [T, G, Dh]: a copy per
// row and head, where advanced indexing builds index tensors first (~25 us a call at decode).
void kv_write(torch::Tensor cache, torch::Tensor slots, torch::Tensor positions,
              torch::Tensor src) {
  TORCH_CHECK(cache.dim() == 4 && cache.is_contiguous() && cache.scalar_type() == torch::kFloat,
              "kv_write: a contiguous float32 cache [S, G, M, Dh]");
  const int64_t S = cache.size(0), G = cache.size(1), M = cache.size(2), Dh = cache.size(3);
  TORCH_CHECK(src.dim() == 3 && src.size(1) == G && src.size(2) == Dh
              && src.scalar_type() == torch::kFloat, "kv_write: src [T, G, Dh] float32");
  src = src.contiguous();
  auto sl = slots.to(torch::kLong).contiguous(), ps = positions.to(torch::kLong).contiguous();
  const int64_t T = src.size(0);
  TORCH_CHECK(sl.numel() == T && ps.numel() == T, "kv_write: a slot and a position per row");
  const int64_t *sp = sl.data_ptr<int64_t>(), *pp = ps.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(sp[t] >= 0 && sp[t] < S && pp[t] >= 0 && pp[t] < M,
                "kv_write: slot or position outside the cache");
  float* cp = cache.data_ptr<float>();
  const float* xp = src.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t)
    for (int64_t g = 0; g < G; ++g)
      std::copy(xp + (t * G + g) * Dh, xp + (t * G + g + 1) * Dh,
                cp + ((sp[t] * G + g) * M + pp[t]) * Dh);
}

// How many threads at::parallel_for gives n items here (a check of the build: compiled without
// OpenMP it silently runs everything on one).
"""
