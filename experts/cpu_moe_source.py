"""C++ of the MoE layer's steps around the experts (compiled and exposed by experts/cpu_kernels.py).

Shape legend: T tokens, E logical experts, K experts per token, N kept pairs, S slots, D hidden.

Each is one call where torch takes several operators: top-k gating (softmax, topk, sum, div),
grouping pairs by slot (argsort, scatter_add, floor_divide and their allocations) and the combine
with the residual (zeros, index_put, mul, sum, add). At a decode step's 16 tokens the operators'
own cost is the work: measured 1.5 ms a step for the four layers' gating, grouping and combine
(BENCHMARKS.md). The definitions they must match are router/gating.py `top_k_gating` and
router/dispatch.py `group_by_slot` and `combine`: the same experts and the same bits, tested
against them (tests/unit/test_cpu_kernels.py).
"""

SOURCE = r"""
// router_logits [T, E] -> weights [T, K] float32, experts [T, K] int64, probs [T, E] float32:
// the softmax over all experts in float32, the k most probable (picked by at::topk, so that ties
// go where torch.topk, and transformers with it, sends them), their probabilities renormalised
// to sum to one.
std::vector<torch::Tensor> top_k_gating(torch::Tensor logits, int64_t k) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == torch::kFloat,
              "top_k_gating: float32 logits [T, E]");
  logits = logits.contiguous();
  const int64_t T = logits.size(0), E = logits.size(1);
  TORCH_CHECK(k >= 1 && k <= E, "top_k_gating: k must be 1..E");
  auto probs = torch::empty({T, E}, logits.options());
  const float* lp = logits.data_ptr<float>();
  float* pp = probs.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t) {
    const float* l = lp + t * E;
    float* p = pp + t * E;
    float top = l[0], total = 0.0f;
    for (int64_t e = 1; e < E; ++e) top = std::max(top, l[e]);
    for (int64_t e = 0; e < E; ++e) total += (p[e] = std::exp(l[e] - top));
    for (int64_t e = 0; e < E; ++e) p[e] /= total;
  }
  auto [weights, experts] = at::topk(probs, k, /*dim=*/1);
  weights = weights.contiguous();
  float* wp = weights.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t) {
    float kept = 0.0f;
    for (int64_t j = 0; j < k; ++j) kept += wp[t * k + j];
    for (int64_t j = 0; j < k; ++j) wp[t * k + j] /= kept;
  }
  return {weights, experts.contiguous(), probs};
}

// slots [T, K] (a physical slot per token-expert pair, -1: dropped) -> pair_idx [N] (flat pair
// t*K + k, sorted by slot, in pair order within a slot), token_idx [N] (its token), counts [S]:
// a counting sort, stable as torch.argsort(stable=True).
std::vector<torch::Tensor> group_by_slot(torch::Tensor slots, int64_t num_slots) {
  TORCH_CHECK(slots.dim() == 2, "group_by_slot: slots [T, K]");
  slots = slots.to(torch::kLong).contiguous();
  const int64_t K = slots.size(1), P = slots.numel();
  const int64_t* sp = slots.data_ptr<int64_t>();
  auto counts = torch::zeros({num_slots}, slots.options());
  int64_t* cp = counts.data_ptr<int64_t>();
  int64_t kept = 0;
  for (int64_t p = 0; p < P; ++p) {
    if (sp[p] < 0) continue;
    TORCH_CHECK(sp[p] < num_slots, "group_by_slot: a slot id beyond num_slots");
    ++cp[sp[p]];
    ++kept;
  }
  std::vector<int64_t> next(num_slots);  // where each slot's next pair goes
  for (int64_t s = 0, at = 0; s < num_slots; at += cp[s], ++s) next[s] = at;
  auto pair_idx = torch::empty({kept}, slots.options());
  auto token_idx = torch::empty({kept}, slots.options());
  int64_t *pi = pair_idx.data_ptr<int64_t>(), *ti = token_idx.data_ptr<int64_t>();
  for (int64_t p = 0; p < P; ++p) {
    if (sp[p] < 0) continue;
    const int64_t at = next[sp[p]]++;
    pi[at] = p;
    ti[at] = p / K;
  }
  return {pair_idx, token_idx, counts};
}

// h [T, D] + each token's expert outputs weighted and summed: y [N, D] in dispatch order (row n
// holds pair pair_idx[n] = t*K + k), weights [T, K] float32 -> [T, D]. As router/dispatch.py's
// combine then the residual add: each product rounded, summed over k in order (a dropped pair
// adds zero), then added to h.
torch::Tensor combine_add(torch::Tensor h, torch::Tensor y, torch::Tensor pair_idx,
                          torch::Tensor weights) {
  TORCH_CHECK(h.dim() == 2 && y.dim() == 2 && weights.dim() == 2 && y.size(1) == h.size(1)
              && weights.size(0) == h.size(0) && h.scalar_type() == torch::kFloat
              && y.scalar_type() == torch::kFloat && weights.scalar_type() == torch::kFloat,
              "combine_add: float32 h [T, D], y [N, D], weights [T, K]");
  h = h.contiguous();
  y = y.contiguous();
  weights = weights.contiguous();
  auto pairs = pair_idx.to(torch::kLong).contiguous();
  const int64_t T = h.size(0), D = h.size(1), K = weights.size(1), N = y.size(0);
  TORCH_CHECK(pairs.numel() == N, "combine_add: a pair index per row of y");
  std::vector<int64_t> row(T * K, -1);  // pair -> its row of y (-1: dropped)
  const int64_t* pp = pairs.data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n) {
    TORCH_CHECK(pp[n] >= 0 && pp[n] < T * K, "combine_add: a pair index outside [0, T*K)");
    row[pp[n]] = n;
  }
  auto out = torch::empty_like(h);
  const float *hp = h.data_ptr<float>(), *yp = y.data_ptr<float>(), *wp = weights.data_ptr<float>();
  float* op = out.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t) {
    int64_t d = 0;
    for (; d + W <= D; d += W) {
      vec acc = vzero();
      for (int64_t k = 0; k < K; ++k) {
        const int64_t n = row[t * K + k];
        if (n >= 0) acc = vadd(acc, vmul(vload(yp + n * D + d), vset(wp[t * K + k])));
      }
      vstore(op + t * D + d, vadd(vload(hp + t * D + d), acc));
    }
    for (; d < D; ++d) {
      float acc = 0.0f;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t n = row[t * K + k];
        if (n >= 0) acc += yp[n * D + d] * wp[t * K + k];
      }
      op[t * D + d] = hp[t * D + d] + acc;
    }
  }
  return out;
}
"""
