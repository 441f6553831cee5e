// Decode attention over the paged KV cache in one call per layer, for CPUs.
//
// A decode step has one query per sequence. Each (sequence, KV head) is one task: the new key and
// value go into their cache slot, then the task's query heads (the group sharing that KV head) score
// every key the sequence owns, reading the blocks through its block table where they lie, with no
// gather into a dense copy; softmax and the weighted sum of values run in float32. Attention sinks
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
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  const float* sink = sinks ? sinks->data_ptr<float>() : nullptr;
  T* op = out.data_ptr<T>();
  auto slot = [&](int64_t b, int64_t h, int64_t pos) {  // offset of (sequence b, kv head h, position pos) in a cache half
    return ((tables[b * width + pos / block_size] * kv_heads + h) * block_size + pos % block_size) * dim;
  };
  // visit(t, row) for the n positions from `first` of sequence b's kv head h, block by block (one division a block)
  auto for_each_key = [&](int64_t b, int64_t h, int64_t first, int64_t n, const T* half, auto&& visit) {
    for (int64_t t = 0; t < n;) {
      const int64_t offset = (first + t) % block_size, count = std::min(block_size - offset, n - t);
      const T* row = half + slot(b, h, first + t);
      for (int64_t i = 0; i < count; ++i, ++t, row += dim) visit(t, row);
    }
  };
  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t task0, int64_t task1) {
    // 64-byte aligned (a vector of __m512), so that storing a vector and loading it back forwards in the core
    std::vector<__m512> query_lanes(group * dim / 16), acc_lanes(group * dim / 16), key_lanes(dim / 16);
    float* query = reinterpret_cast<float*>(query_lanes.data());
    float* acc = reinterpret_cast<float*>(acc_lanes.data());
    float* key = reinterpret_cast<float*>(key_lanes.data());
    std::vector<float> scores;
    for (int64_t task = task0; task < task1; ++task) {
      const int64_t b = task / kv_heads, h = task % kv_heads, ctx = lens[b];
      const int64_t first = window > 0 ? std::max<int64_t>(0, ctx - window) : 0, n = ctx - first;
      std::copy_n(kp + (b * kv_heads + h) * dim, dim, k_cache + slot(b, h, ctx - 1));
      std::copy_n(vp + (b * kv_heads + h) * dim, dim, v_cache + slot(b, h, ctx - 1));
      for (int64_t i = 0; i < group * dim; ++i) query[i] = static_cast<float>(qp[(b * heads + h * group) * dim + i]);
      scores.assign(group * n, 0.0f);
      for_each_key(b, h, first, n, k_cache, [&](int64_t t, const T* kt) {
        for (int64_t d = 0; d < dim; d += 16) _mm512_storeu_ps(key + d, load16(kt + d));
        for (int64_t g = 0; g < group; ++g) {
          __m512 dot = _mm512_setzero_ps();
          for (int64_t d = 0; d < dim; d += 16)
            dot = _mm512_fmadd_ps(_mm512_loadu_ps(query + g * dim + d), _mm512_loadu_ps(key + d), dot);
          scores[g * n + t] = _mm512_reduce_add_ps(dot) * static_cast<float>(scale);
        }
      });
      std::vector<float> total(group);
      for (int64_t g = 0; g < group; ++g) {
        float* s = scores.data() + g * n;
        const float sink_logit = sink ? sink[h * group + g] : -std::numeric_limits<float>::infinity();
        const float peak = std::max(sink_logit, *std::max_element(s, s + n));
        for (int64_t t = 0; t < n; ++t) s[t] = std::exp(s[t] - peak);  // a loop of its own: vectorized exp
        float sum = sink ? std::exp(sink_logit - peak) : 0.0f;
        for (int64_t t = 0; t < n; ++t) sum += s[t];
        total[g] = sum;
      }
      std::fill(acc, acc + group * dim, 0.0f);
      for_each_key(b, h, first, n, v_cache, [&](int64_t t, const T* vt) {
        for (int64_t d = 0; d < dim; d += 16) {
          const __m512 value = load16(vt + d);
          for (int64_t g = 0; g < group; ++g) {
            float* a = acc + g * dim + d;
            _mm512_storeu_ps(a, _mm512_fmadd_ps(_mm512_set1_ps(scores[g * n + t]), value, _mm512_loadu_ps(a)));
          }
        }
      });
      for (int64_t g = 0; g < group; ++g)
        for (int64_t d = 0; d < dim; ++d)
          op[(b * heads + h * group + g) * dim + d] = static_cast<T>(acc[g * dim + d] / total[g]);
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
  TORCH_CHECK(q.size(2) % 16 == 0, "decode_attention needs a head dim that is a multiple of 16");
  auto out = torch::empty_like(q);
  if (kv_cache.scalar_type() == at::kBFloat16)
    decode_attention_impl<at::BFloat16>(q, k, v, kv_cache, block_tables, context_lens, scale, window, sinks, out);
  else if (kv_cache.scalar_type() == at::kFloat)
    decode_attention_impl<float>(q, k, v, kv_cache, block_tables, context_lens, scale, window, sinks, out);
  else
    TORCH_CHECK(false, "decode_attention takes bfloat16 or float32");
  return out;
}
