// Attention over the paged KV cache in one call per layer, for CPUs.
//
// Every row is one query token with its own keys: a decode (one row per sequence) or a token of a prompt chunk
// (its sequence's table, the keys up to its own position). The new keys and values of all rows go into their
// cache slots first, so a chunk's tokens see each other causally; then each (row, kv head) is one task: the
// query heads of its GQA group score every key of the row, reading the blocks through the table where they lie
// (no gather into a dense copy), in one pass of online softmax, in float32. Attention sinks (gpt-oss) join the
// softmax's denominator; a sliding window starts the keys later.
//
// An fp8 cache (layers/kv_cache_dtype.py) holds each row as D e4m3 codes and the exponent e of the row's scale 2^e:
// the new rows are converted on write; the cached ones are read 16 at a time, once for the whole GQA group, into
// the model's dtype (code * 2^e is exact in bf16 as in float32), and attended to as a plain cache's.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#include "simd_math.h"
#include "tensor_args.h"

namespace {

// One query head in registers, and its dot product with a key row as 16 partial sums. bf16 pairs go through
// vdpbf16ps (two elements a lane, products exact in float32); float32 through FMAs. Head dim = 16 NC.
template <typename T, int NC>
struct Query;

template <int NC>
struct Query<float, NC> {
  __m512 lanes[NC];
  explicit Query(const float* q) {
    for (int c = 0; c < NC; ++c) lanes[c] = _mm512_loadu_ps(q + 16 * c);
  }
  __m512 dot(const float* key) const {
    __m512 sum = _mm512_mul_ps(lanes[0], _mm512_loadu_ps(key));
    for (int c = 1; c < NC; ++c) sum = _mm512_fmadd_ps(lanes[c], _mm512_loadu_ps(key + 16 * c), sum);
    return sum;
  }
};

template <int NC>
struct Query<at::BFloat16, NC> {
  static constexpr int kPairs = (NC + 1) / 2;  // 32 elements a register; an odd NC leaves the top half zero
  __m512bh lanes[kPairs];
  static __m512bh load(const at::BFloat16* p, int c) {
    const __mmask32 half = 2 * c + 1 < NC ? 0xffffffffu : 0xffffu;
    return (__m512bh)_mm512_maskz_loadu_epi16(half, p + 32 * c);
  }
  explicit Query(const at::BFloat16* q) {
    for (int c = 0; c < kPairs; ++c) lanes[c] = load(q, c);
  }
  __m512 dot(const at::BFloat16* key) const {
    __m512 sum = _mm512_setzero_ps();
    for (int c = 0; c < kPairs; ++c) sum = _mm512_dpbf16_ps(sum, lanes[c], load(key, c));
    return sum;
  }
};

// A cache of rows as the model's numbers T, copied in and read where they lie.
template <typename T>
struct PlainRows {
  using Elem = T;
  static constexpr int64_t kExtra = 0;  // elements a row holds past its D numbers
  static void store(const T* x, int64_t dim, T* row) { std::copy_n(x, dim, row); }
};

inline void store16(float* p, __m512 x) { _mm512_storeu_ps(p, x); }
inline void store16(at::BFloat16* p, __m512 x) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(x));
}

// 2^e as a float32, from its bits
inline float power_of_two(int32_t e) {
  const uint32_t bits = static_cast<uint32_t>(e + 127) << 23;
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

// 16 float32 lanes rounded to nearest even to e4m3 codes, saturating at +-448. From |x| >= 2^-6 (normal): the 23
// mantissa bits rounded to 3 (a carry moves into the exponent), the exponent rebiased from 127 to 7; below
// (subnormal): |x| in multiples of 2^-9, rounded to an integer 0..8 (8 is the smallest normal's code).
inline __m128i to_e4m3(__m512 x) {
  const __m512i sign = _mm512_and_si512(_mm512_srli_epi32(_mm512_castps_si512(x), 24), _mm512_set1_epi32(0x80));
  const __m512 size = _mm512_min_ps(_mm512_abs_ps(x), _mm512_set1_ps(448.0f));
  const __m512i bits = _mm512_castps_si512(size);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 20), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7ffff)));
  const __m512i normal = _mm512_sub_epi32(_mm512_srli_epi32(rounded, 20), _mm512_set1_epi32((127 - 7) << 3));
  const __m512i subnormal = _mm512_cvt_roundps_epi32(_mm512_mul_ps(size, _mm512_set1_ps(512.0f)),
                                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __mmask16 small = _mm512_cmp_ps_mask(size, _mm512_set1_ps(1.0f / 64), _CMP_LT_OQ);
  return _mm512_cvtepi32_epi8(_mm512_or_si512(_mm512_mask_blend_epi32(small, normal, subnormal), sign));
}

// A cache of fp8 rows (layers/kv_cache_dtype.py): D e4m3 codes, then the exponent e of the row's scale, one
// signed byte; number = code * 2^e.
struct Fp8Rows {
  using Elem = uint8_t;
  static constexpr int64_t kExtra = 1;

  // x's D numbers as a row: e = floor(log2(max |x|)) - 7 within [-64, 64], codes = e4m3(x / 2^e)
  template <typename T>
  static void store(const T* x, int64_t dim, uint8_t* row) {
    __m512 top = _mm512_setzero_ps();
    for (int64_t d = 0; d < dim; d += 16) top = _mm512_max_ps(top, _mm512_abs_ps(::load16(x + d)));
    const float largest = _mm512_reduce_max_ps(top);
    uint32_t bits;
    std::memcpy(&bits, &largest, sizeof bits);
    const int32_t e = std::clamp(static_cast<int32_t>(bits >> 23) - (127 + 7), -64, 64);
    const __m512 down = _mm512_set1_ps(power_of_two(-e));
    for (int64_t d = 0; d < dim; d += 16)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(row + d), to_e4m3(_mm512_mul_ps(::load16(x + d), down)));
    row[dim] = static_cast<uint8_t>(static_cast<int8_t>(e));
  }

  // 16 codes as float32 lanes, each code's number times 2^-8: the e4m3 bits moved into fp16's places (whose
  // exponent bias is 8 more), subnormals onto fp16's subnormals, then converted exactly by vcvtph2ps
  static __m512 load16(const uint8_t* p) {
    const __m256i codes = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    const __m256i sign = _mm256_slli_epi16(_mm256_and_si256(codes, _mm256_set1_epi16(0x80)), 8);
    const __m256i rest = _mm256_slli_epi16(_mm256_and_si256(codes, _mm256_set1_epi16(0x7f)), 7);
    return _mm512_cvtph_ps(_mm256_or_si256(sign, rest));
  }

  // m rows, `stride` apart, as their numbers in T, `dim` apart in `out`
  template <typename T>
  static void read(const uint8_t* rows, int64_t m, int64_t dim, int64_t stride, T* out) {
    for (int64_t j = 0; j < m; ++j) {
      const uint8_t* row = rows + j * stride;
      const __m512 scale = _mm512_set1_ps(power_of_two(static_cast<int8_t>(row[dim]) + 8));  // 2^8 undoes load16's
      for (int64_t d = 0; d < dim; d += 16) store16(out + j * dim + d, _mm512_mul_ps(load16(row + d), scale));
    }
  }
};

// Where sequence b's keys and values lie: the cache halves [N, Hkv, S, stride] (stride: D, or D + 1 for fp8 rows)
// and the sequence's block table.
template <typename T>
struct PagedKV {
  const T* k_cache;
  const T* v_cache;
  const int64_t* tables;
  int64_t width, kv_heads, block_size, stride;

  // offset in a cache half of position pos of sequence b's kv head h
  int64_t row(int64_t b, int64_t h, int64_t pos) const {
    return ((tables[b * width + pos / block_size] * kv_heads + h) * block_size + pos % block_size) * stride;
  }

  // visit(count, first key row, first value row) for each run of positions lying in one block (their rows
  // follow each other), from `first` over n positions of sequence b's kv head h; the next run is asked for
  // while this one is visited, since blocks lie anywhere and the hardware prefetcher cannot guess the next
  template <typename Visit>
  void for_each_run(int64_t b, int64_t h, int64_t first, int64_t n, Visit&& visit) const {
    int64_t at = row(b, h, first);
    for (int64_t t = 0; t < n;) {
      const int64_t count = std::min(block_size - (first + t) % block_size, n - t);
      const int64_t next = t + count < n ? row(b, h, first + t + count) : -1;
      if (next >= 0)
        for (int64_t byte = 0; byte < std::min(block_size, n - t - count) * stride * int64_t(sizeof(T)); byte += 64) {
          _mm_prefetch(reinterpret_cast<const char*>(k_cache + next) + byte, _MM_HINT_T1);
          _mm_prefetch(reinterpret_cast<const char*>(v_cache + next) + byte, _MM_HINT_T1);
        }
      visit(count, k_cache + at, v_cache + at);
      t += count;
      at = next;
    }
  }
};

// Below this the softmax's running maximum starts: finite, since -ffast-math assumes no infinities.
constexpr float kNoScore = -1e30f;

// The query heads sharing one kv head (a GQA group) of one sequence, by online softmax (Milakov & Gimelshein
// 2018) over chunks of up to 16 keys: each key and value row is read once for the whole group. Per head, the
// chunk's 16 dot products are summed across lanes together (sum_each16), so the scores come out as one vector for
// the exponential; the running sum of values is rescaled whenever the maximum grows. NC = head dim / 16. T: the
// query's and the output's numbers; R: how the cache holds its rows (PlainRows<T> or Fp8Rows).
template <typename T, typename R, int NC>
void attend_group(const T* query, int64_t group, const PagedKV<typename R::Elem>& kv, int64_t b, int64_t h,
                  int64_t first, int64_t n, float scale, const float* sink, std::vector<float>& scratch, T* out) {
  using E = typename R::Elem;
  const int64_t dim = 16 * NC, stride = kv.stride;
  scratch.resize(group * (dim + 2));
  float* acc = scratch.data();          // [group, dim]
  float* peak = acc + group * dim;      // [group]
  float* total = peak + group;          // [group]
  for (int64_t g = 0; g < group; ++g) {
    for (int c = 0; c < NC; ++c) _mm512_storeu_ps(acc + g * dim + 16 * c, _mm512_setzero_ps());
    peak[g] = sink ? sink[g] : kNoScore;  // a sink is one more logit, with no value: e^0 = 1 in the sum
    total[g] = sink ? 1.0f : 0.0f;
  }
  alignas(64) float probs[16];
  alignas(64) T read_rows[R::kExtra > 0 ? 2 * 16 * 16 * NC : 1];  // fp8: a chunk's key and value rows as numbers
  kv.for_each_run(b, h, first, n, [&](int64_t count, const E* keys, const E* values) {
    for (int64_t c0 = 0; c0 < count; c0 += 16) {
      const int64_t m = std::min<int64_t>(16, count - c0);
      const __mmask16 valid = static_cast<__mmask16>((1u << m) - 1);
      const T* key;  // the chunk's rows, dim apart
      const T* value;
      if constexpr (R::kExtra > 0) {
        R::read(keys + c0 * stride, m, dim, stride, read_rows);
        R::read(values + c0 * stride, m, dim, stride, read_rows + 16 * dim);
        key = read_rows;
        value = read_rows + 16 * dim;
      } else {
        key = keys + c0 * dim;
        value = values + c0 * dim;
      }
      for (int64_t g = 0; g < group; ++g) {
        const Query<T, NC> q(query + g * dim);
        __m512 dots[16];
        for (int64_t j = 0; j < 16; ++j) dots[j] = j < m ? q.dot(key + j * dim) : _mm512_setzero_ps();
        const __m512 scores = _mm512_mask_blend_ps(valid, _mm512_set1_ps(kNoScore),
                                                   _mm512_mul_ps(sum_each16(dots), _mm512_set1_ps(scale)));
        const float grown = std::max(peak[g], _mm512_reduce_max_ps(scores));
        const float rescale = std::exp(peak[g] - grown);
        const __m512 p = _mm512_maskz_mov_ps(valid, exp16(_mm512_sub_ps(scores, _mm512_set1_ps(grown))));
        _mm512_store_ps(probs, p);
        total[g] = total[g] * rescale + _mm512_reduce_add_ps(p);
        peak[g] = grown;
        __m512 sum[NC];
        for (int c = 0; c < NC; ++c)
          sum[c] = _mm512_mul_ps(_mm512_loadu_ps(acc + g * dim + 16 * c), _mm512_set1_ps(rescale));
        for (int64_t j = 0; j < m; ++j) {
          const __m512 pj = _mm512_set1_ps(probs[j]);
          for (int c = 0; c < NC; ++c) sum[c] = _mm512_fmadd_ps(pj, load16(value + j * dim + 16 * c), sum[c]);
        }
        for (int c = 0; c < NC; ++c) _mm512_storeu_ps(acc + g * dim + 16 * c, sum[c]);
      }
    }
  });
  for (int64_t g = 0; g < group; ++g)
    for (int64_t d = 0; d < dim; ++d) out[g * dim + d] = static_cast<T>(acc[g * dim + d] / total[g]);
}

template <typename T, typename R>
using AttendGroup = void (*)(const T*, int64_t, const PagedKV<typename R::Elem>&, int64_t, int64_t, int64_t, int64_t,
                             float, const float*, std::vector<float>&, T*);

template <typename T, typename R>
void paged_attention_impl(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                           torch::Tensor& kv_cache, const torch::Tensor& block_tables,
                           const torch::Tensor& context_lens, double scale, int64_t window,
                           const std::optional<torch::Tensor>& sinks, torch::Tensor& out) {
  const int64_t batch = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t blocks = kv_cache.size(1), kv_heads = kv_cache.size(2), block_size = kv_cache.size(3);
  const int64_t group = heads / kv_heads, width = block_tables.size(1);
  using E = typename R::Elem;
  const int64_t stride = dim + R::kExtra;
  E* k_cache = static_cast<E*>(kv_cache.data_ptr());
  E* v_cache = k_cache + blocks * kv_heads * block_size * stride;
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  const PagedKV<E> kv{k_cache, v_cache, tables, width, kv_heads, block_size, stride};
  for (int64_t b = 0; b < batch; ++b)  // the new keys and values first: every head of the step reads them
    for (int64_t h = 0; h < kv_heads; ++h) {
      const int64_t at = kv.row(b, h, lens[b] - 1);
      R::store(k.data_ptr<T>() + b * k.stride(0) + h * dim, dim, k_cache + at);
      R::store(v.data_ptr<T>() + b * v.stride(0) + h * dim, dim, v_cache + at);
    }
  constexpr AttendGroup<T, R> kGroups[9] = {nullptr, attend_group<T, R, 1>, attend_group<T, R, 2>,
                                            attend_group<T, R, 3>, attend_group<T, R, 4>, attend_group<T, R, 5>,
                                            attend_group<T, R, 6>, attend_group<T, R, 7>, attend_group<T, R, 8>};
  const AttendGroup<T, R> attend = kGroups[dim / 16];
  const T* qp = q.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const float* sink = sinks ? sinks->data_ptr<float>() : nullptr;
  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t task0, int64_t task1) {
    std::vector<float> scratch;
    for (int64_t task = task0; task < task1; ++task) {
      // rows taken from both ends in turn (0, B-1, 1, B-2, ...): the rows of a prompt chunk see 1, 2, ... keys,
      // and each thread's share of the tasks, a contiguous range, then holds as many keys as the other's
      const int64_t turn = task / kv_heads, h = task % kv_heads;
      const int64_t b = turn % 2 == 0 ? turn / 2 : batch - 1 - turn / 2, ctx = lens[b];
      const int64_t first = window > 0 ? std::max<int64_t>(0, ctx - window) : 0;
      const int64_t head = h * group;  // the group's first query head
      attend(qp + b * q.stride(0) + head * dim, group, kv, b, h, first, ctx - first, static_cast<float>(scale),
             sink ? sink + head : nullptr, scratch, op + (b * heads + head) * dim);
    }
  });
}

// Refuses a row whose keys run past its table, or whose table names a block outside the cache where it is read
// (padding past a row's last block is never read, and may hold anything).
void check_blocks_read(const torch::Tensor& block_tables, const torch::Tensor& context_lens, int64_t window,
                       int64_t blocks, int64_t block_size) {
  const int64_t batch = block_tables.size(0), width = block_tables.size(1);
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t ctx = lens[b];
    TORCH_CHECK(ctx >= 1 && ctx <= width * block_size, "paged_attention: row ", b, " has ", ctx,
                " keys, outside 1 .. its table's ", width * block_size);
    const int64_t first = window > 0 ? std::max<int64_t>(0, ctx - window) : 0;
    for (int64_t i = first / block_size; i <= (ctx - 1) / block_size; ++i)
      TORCH_CHECK(tables[b * width + i] >= 0 && tables[b * width + i] < blocks, "paged_attention: row ", b,
                  " reads block ", tables[b * width + i], ", outside the cache's ", blocks);
  }
}

// t [B, heads, D] with each row's heads side by side, the rows at any stride (a step's q, k and v are views
// into the one projection of its tokens): copied only where that does not hold.
torch::Tensor rows_of_heads(const torch::Tensor& t) {
  return t.stride(2) == 1 && t.stride(1) == t.size(2) ? t : t.contiguous();
}

}  // namespace

// q [B, H, D], k/v [B, Hkv, D]: B query rows (tokens) and their new keys and values; kv_cache [2, N, Hkv, S, D]
// bfloat16 or float32, or [2, N, Hkv, S, D + 1] float8_e4m3fn (rows of codes and their exponent); block_tables
// [B, W] int64, each row's sequence's table; context_lens [B] int64, each row's keys (its position + 1: the new one
// included); window 0 for full attention; sinks [H] float32 or None. Writes k/v into the cache at each row's
// position; returns [B, H, D] in the cache's dtype, or q's over an fp8 cache.
torch::Tensor paged_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor kv_cache,
                               torch::Tensor block_tables, torch::Tensor context_lens, double scale,
                               int64_t window, std::optional<torch::Tensor> sinks) {
  check_on_cpu("paged_attention", {&q, &k, &v, &kv_cache, &block_tables, &context_lens});
  if (sinks) check_on_cpu("paged_attention", {&*sinks});
  TORCH_CHECK(kv_cache.is_contiguous() && kv_cache.dim() == 5 && kv_cache.size(0) == 2,
              "paged_attention needs a contiguous [2, N, Hkv, S, D] cache");
  const bool fp8 = kv_cache.scalar_type() == at::kFloat8_e4m3fn;
  TORCH_CHECK(fp8 || kv_cache.scalar_type() == at::kBFloat16 || kv_cache.scalar_type() == at::kFloat,
              "paged_attention takes a bfloat16, float32 or float8_e4m3fn cache");
  const at::ScalarType type = fp8 ? q.scalar_type() : kv_cache.scalar_type();  // of q, k, v and the output
  TORCH_CHECK(type == at::kBFloat16 || type == at::kFloat, "paged_attention over an fp8 cache takes a bfloat16 "
              "or float32 q");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "paged_attention takes q [B, H, D], k and v [B, Hkv, D]");
  const int64_t batch = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t blocks = kv_cache.size(1), kv_heads = kv_cache.size(2), block_size = kv_cache.size(3);
  TORCH_CHECK(kv_heads > 0 && block_size > 0 && heads > 0 && heads % kv_heads == 0,
              "paged_attention needs query heads a positive multiple of the cache's kv heads, and blocks of > 0");
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == batch && k.size(1) == kv_heads && k.size(2) == dim &&
              kv_cache.size(4) == dim + (fp8 ? 1 : 0), "paged_attention: q, k, v and the cache do not match");
  TORCH_CHECK(dim % 16 == 0 && dim >= 16 && dim <= 128, "paged_attention takes head dims 16, 32, ..., 128");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == batch && context_lens.dim() == 1 &&
              context_lens.size(0) == batch && is_integer(block_tables) && is_integer(context_lens),
              "paged_attention takes integer block_tables [B, W] and context_lens [B]");
  TORCH_CHECK(!sinks || (sinks->dim() == 1 && sinks->size(0) == heads), "paged_attention takes sinks [H]");
  TORCH_CHECK(window >= 0, "paged_attention takes a window >= 0 (0: full attention)");
  auto out = torch::empty({batch, heads, dim}, q.options().dtype(type));
  if (batch == 0) return out;
  block_tables = of_type(block_tables, at::kLong).contiguous();
  context_lens = of_type(context_lens, at::kLong).contiguous();
  check_blocks_read(block_tables, context_lens, window, blocks, block_size);
  q = rows_of_heads(of_type(q, type));
  k = rows_of_heads(of_type(k, type));
  v = rows_of_heads(of_type(v, type));
  if (sinks) sinks = of_type(*sinks, at::kFloat).contiguous();
  const auto impl = fp8 ? (type == at::kBFloat16 ? paged_attention_impl<at::BFloat16, Fp8Rows>
                                                 : paged_attention_impl<float, Fp8Rows>)
                        : (type == at::kBFloat16 ? paged_attention_impl<at::BFloat16, PlainRows<at::BFloat16>>
                                                 : paged_attention_impl<float, PlainRows<float>>);
  impl(q, k, v, kv_cache, block_tables, context_lens, scale, window, sinks, out);
  return out;
}
