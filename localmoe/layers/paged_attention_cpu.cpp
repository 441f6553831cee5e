// Decode attention over the paged KV cache in one call per layer, for CPUs.
//
// A decode step has one query per sequence. The new keys and values go into their cache slots first;
// then each (sequence, query head) is one task that scores every key the sequence owns, reading the
// blocks through its block table where they lie, with no gather into a dense copy; softmax and the
// weighted sum of values run in float32, the query and the sum held in registers. Attention sinks
// (gpt-oss) join the softmax's denominator; a sliding window starts the keys later.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <vector>

namespace {

// 16 consecutive values as float32 lanes (head dims are a multiple of 16)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));  // bf16 is the top half of a float32
}

// Where sequence b's keys and values lie: the cache halves [N, Hkv, S, D] and the sequence's block table.
template <typename T>
struct PagedKV {
  const T* k_cache;
  const T* v_cache;
  const int64_t* tables;
  int64_t width, kv_heads, block_size, dim;

  // offset in a cache half of position pos of sequence b's kv head h
  int64_t row(int64_t b, int64_t h, int64_t pos) const {
    return ((tables[b * width + pos / block_size] * kv_heads + h) * block_size + pos % block_size) * dim;
  }

  // visit(t, key row, value row) for the n positions from `first` of sequence b's kv head h, block by block
  template <typename Visit>
  void for_each(int64_t b, int64_t h, int64_t first, int64_t n, Visit&& visit) const {
    for (int64_t t = 0; t < n;) {
      const int64_t at = row(b, h, first + t), count = std::min(block_size - (first + t) % block_size, n - t);
      for (int64_t i = 0; i < count; ++i, ++t) visit(t, k_cache + at + i * dim, v_cache + at + i * dim);
    }
  }
};

// One query head of one sequence: its query and output accumulator live in NC registers (head dim 16 * NC).
template <typename T, int NC>
void attend_head(const T* query, const PagedKV<T>& kv, int64_t b, int64_t h, int64_t first, int64_t n, float scale,
                 const float* sink, std::vector<float>& scores, T* out) {
  __m512 q[NC], acc[NC];
  for (int c = 0; c < NC; ++c) {
    q[c] = _mm512_mul_ps(load16(query + 16 * c), _mm512_set1_ps(scale));
    acc[c] = _mm512_setzero_ps();
  }
  scores.resize(n);
  float* s = scores.data();
  kv.for_each(b, h, first, n, [&](int64_t t, const T* key, const T*) {
    __m512 dot = _mm512_mul_ps(q[0], load16(key));
    for (int c = 1; c < NC; ++c) dot = _mm512_fmadd_ps(q[c], load16(key + 16 * c), dot);
    s[t] = _mm512_reduce_add_ps(dot);
  });
  const float sink_logit = sink ? *sink : -std::numeric_limits<float>::infinity();
  const float peak = std::max(sink_logit, *std::max_element(s, s + n));
  for (int64_t t = 0; t < n; ++t) s[t] = std::exp(s[t] - peak);  // a loop of its own: vectorized exp
  float total = sink ? std::exp(sink_logit - peak) : 0.0f;
  for (int64_t t = 0; t < n; ++t) total += s[t];
  kv.for_each(b, h, first, n, [&](int64_t t, const T*, const T* value) {
    const __m512 p = _mm512_set1_ps(s[t]);
    for (int c = 0; c < NC; ++c) acc[c] = _mm512_fmadd_ps(p, load16(value + 16 * c), acc[c]);
  });
  alignas(64) float row[16 * NC];
  for (int c = 0; c < NC; ++c) _mm512_store_ps(row + 16 * c, _mm512_div_ps(acc[c], _mm512_set1_ps(total)));
  for (int d = 0; d < 16 * NC; ++d) out[d] = static_cast<T>(row[d]);
}

template <typename T>
using AttendHead = void (*)(const T*, const PagedKV<T>&, int64_t, int64_t, int64_t, int64_t, float, const float*,
                            std::vector<float>&, T*);

template <typename T>
void decode_attention_impl(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                           torch::Tensor& kv_cache, const torch::Tensor& block_tables,
                           const torch::Tensor& context_lens, double scale, int64_t window,
                           const std::optional<torch::Tensor>& sinks, torch::Tensor& out) {
  const int64_t batch = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t blocks = kv_cache.size(1), kv_heads = kv_cache.size(2), block_size = kv_cache.size(3);
  const int64_t group = heads / kv_heads, width = block_tables.size(1);
  T* k_cache = kv_cache.data_ptr<T>();
  T* v_cache = k_cache + blocks * kv_heads * block_size * dim;
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  const PagedKV<T> kv{k_cache, v_cache, tables, width, kv_heads, block_size, dim};
  for (int64_t b = 0; b < batch; ++b)  // the new keys and values first: every head of the step reads them
    for (int64_t h = 0; h < kv_heads; ++h) {
      const int64_t at = kv.row(b, h, lens[b] - 1);
      std::copy_n(k.data_ptr<T>() + (b * kv_heads + h) * dim, dim, k_cache + at);
      std::copy_n(v.data_ptr<T>() + (b * kv_heads + h) * dim, dim, v_cache + at);
    }
  constexpr AttendHead<T> kHeads[9] = {nullptr, attend_head<T, 1>, attend_head<T, 2>, attend_head<T, 3>,
                                       attend_head<T, 4>, attend_head<T, 5>, attend_head<T, 6>, attend_head<T, 7>,
                                       attend_head<T, 8>};
  const AttendHead<T> attend = kHeads[dim / 16];
  const T* qp = q.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const float* sink = sinks ? sinks->data_ptr<float>() : nullptr;
  at::parallel_for(0, batch * heads, 1, [&](int64_t task0, int64_t task1) {
    std::vector<float> scores;
    for (int64_t task = task0; task < task1; ++task) {
      const int64_t b = task / heads, head = task % heads, ctx = lens[b];
      const int64_t first = window > 0 ? std::max<int64_t>(0, ctx - window) : 0;
      attend(qp + task * dim, kv, b, head / group, first, ctx - first, static_cast<float>(scale),
             sink ? sink + head : nullptr, scores, op + task * dim);
    }
  });
}

}  // namespace

// q [B, H, D], k/v [B, Hkv, D]: each sequence's one new token; kv_cache [2, N, Hkv, S, D];
// block_tables [B, W] int64; context_lens [B] int64 (tokens after this step, the new one included);
// window 0 for full attention; sinks [H] float32 or None. Writes k/v into the cache; returns [B, H, D].
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor kv_cache,
                               torch::Tensor block_tables, torch::Tensor context_lens, double scale,
                               int64_t window, std::optional<torch::Tensor> sinks) {
  TORCH_CHECK(kv_cache.is_contiguous() && kv_cache.dim() == 5 && kv_cache.size(0) == 2,
              "decode_attention needs a contiguous [2, N, Hkv, S, D] cache");
  q = q.to(kv_cache.scalar_type()).contiguous();
  k = k.to(kv_cache.scalar_type()).contiguous();
  v = v.to(kv_cache.scalar_type()).contiguous();
  block_tables = block_tables.to(at::kLong).contiguous();
  context_lens = context_lens.to(at::kLong).contiguous();
  if (sinks) sinks = sinks->to(at::kFloat).contiguous();
  TORCH_CHECK(q.size(1) % kv_cache.size(2) == 0 && q.size(2) == kv_cache.size(4), "query and cache shapes differ");
  TORCH_CHECK(q.size(2) % 16 == 0 && q.size(2) <= 128, "decode_attention takes head dims 16, 32, ..., 128");
  auto out = torch::empty_like(q);
  if (kv_cache.scalar_type() == at::kBFloat16)
    decode_attention_impl<at::BFloat16>(q, k, v, kv_cache, block_tables, context_lens, scale, window, sinks, out);
  else if (kv_cache.scalar_type() == at::kFloat)
    decode_attention_impl<float>(q, k, v, kv_cache, block_tables, context_lens, scale, window, sinks, out);
  else
    TORCH_CHECK(false, "decode_attention takes bfloat16 or float32");
  return out;
}
