// The MoE feed-forward and linear layers, bf16 on CPUs with AVX512-BF16, at every batch size.
//
// A decode step multiplies a few tokens by large weights, so it is bound by reading them; a prompt chunk
// multiplies many, so it is bound by arithmetic. Both run here on weights stored in *tiles*: up to 64 rows
// whose column pairs are interleaved ([k/2][rows][2]), so that one 64-byte load holds one column pair of
// 16 rows. vdpbf16ps multiplies it with the token's pair broadcast to every lane, and each lane sums one
// row: no horizontal reductions, a tile is read front to back in one stream, and for up to six tokens at
// once the 4 x 6 float32 sums stay in registers. Expert tiles pair 32 gate rows with their 32 up rows, so
// that SwiGLU is applied to the sums where they are computed.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <type_traits>
#include <vector>

#include "simd_math.h"
#include "tensor_args.h"

namespace {

constexpr int64_t kTileRows = 64;  // 4 registers of 16 row sums
constexpr int64_t kTileUnits = kTileRows / 2;  // an expert tile: this many gate rows, then their up rows
constexpr int64_t kMaxTokens = 6;  // 6 x 4 sums + 4 weight registers + the broadcast token fit the 32 registers
constexpr int64_t kMaxQuantTokens = 3;  // 2 x 3 x 4 sums (a block's, the total) + the weights being widened
// Tiles are read front to back, but from DRAM the hardware's prefetch alone left a decode step waiting on memory
// (int8 experts at 13 of ~30 GB/s, int4 at 10): each pass asks for the cache lines this far ahead itself.
constexpr int64_t kPrefetchAhead = 4096;

// Ask for the `bytes` (a whole number of cache lines, at least one) kPrefetchAhead past `at`.
template <int Bytes>
inline void prefetch_ahead(const void* at) {
  for (int line = 0; line < std::max(Bytes / 64, 1); ++line)
    _mm_prefetch(static_cast<const char*>(at) + kPrefetchAhead + 64 * line, _MM_HINT_T0);
}

// pass(std::integral_constant<int, M>{}, t0) for the n tokens in passes of M <= Max tokens of near-equal size, the
// first at t0 (the tile stays in L2 between passes).
template <int M, int Max, typename Pass>
void pass_of(int64_t size, int64_t t0, Pass& pass) {
  if constexpr (M < Max) {
    if (size > M) return pass_of<M + 1, Max>(size, t0, pass);
  }
  pass(std::integral_constant<int, M>{}, t0);
}

template <int Max, typename Pass>
void in_passes(int64_t n, Pass&& pass) {
  if (n <= 0) return;  // no tokens, no passes (and no division by zero below)
  const int64_t passes = (n + Max - 1) / Max, size = (n + passes - 1) / passes;
  for (int64_t t0 = 0; t0 < n; t0 += size) pass_of<1, Max>(std::min(size, n - t0), t0, pass);
}

// f(std::integral_constant<int, R>{}) for a tile of 16R rows (16, 32, 48 or 64).
template <typename F>
void with_rows(int64_t rows, F&& f) {
  switch (rows / 16) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    default: f(std::integral_constant<int, 4>{}); break;
  }
}

// done(m, sums) with the 16R row sums of token m, for the M tokens x[m] (rows as column pairs) against one bf16 tile
// of 16R rows, `pairs` = k / 2. The sums are locals so that they live in registers (as an output parameter they
// had been stored to memory every iteration).
template <int R, int M, typename Done>
void tile_pass(const int32_t* const* x, int64_t pairs, const int32_t* w, Done& done) {
  __m512 acc[M][R];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    prefetch_ahead<R * 64>(w + p * R * 16);
    __m512bh wv[R];
    for (int r = 0; r < R; ++r) wv[r] = (__m512bh)_mm512_loadu_si512(w + (p * R + r) * 16);
    for (int m = 0; m < M; ++m) {
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(x[m][p]);
      for (int r = 0; r < R; ++r) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], wv[r], xv);
    }
  }
  for (int m = 0; m < M; ++m) done(m, acc[m]);
}

// Most columns of a quantized weight whose products are summed in int32 before they are scaled: with int16
// activations (below) and 8-bit weights, 64 column pairs stay below 2^31. A block is the largest multiple of 16
// up to this that divides the weight's group (quant_block).
constexpr int64_t kQuantBlock = 128;

int64_t quant_block(int64_t group) {
  int64_t block = kQuantBlock;
  while (group % block) block -= 16;
  return block;
}

// tile_pass for a tile of Bits-bit unsigned integers q with a scale s and zero point z per row and group of `group`
// columns: w = s (q - z). The activations come as int16 (quantize_row): per row and block (quant_block) of columns,
// x = scale_b * xq. Each 32 bytes hold 16 rows of one column pair (int8) or two (int4: the low nibbles the first
// pair, the high ones the next), widened to int16 and multiplied in pairs with vpdpwssd into exact int32 sums;
// each block then adds s scale_b (sum q xq - z sum xq) to the float32 sums. Two sets of sums (the block's and the
// total) hold at most 3 tokens in registers. xinfo[m] is token m's (scale, sum xq) per block; scales and zeros are
// the tile's own, [k / group][16R].
template <int Bits, int R, int M, typename Done>
void quant_tile_pass(const int32_t* const* x, const float* const* xinfo, int64_t k, int64_t group, int64_t block_size,
                     const uint8_t* w, const float* scales, const float* zeros, Done& done) {
  constexpr int64_t kPairsPerBlock = Bits == 8 ? 1 : 2;
  const __m512i nibble = _mm512_set1_epi16(0x000F);
  __m512 total[M][R];
  __m512i acc[M][R];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) total[m][r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < k / block_size; ++b) {
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_si512();
    for (int64_t p = b * block_size / 2; p < (b + 1) * block_size / 2; p += kPairsPerBlock) {
      const uint8_t* block = w + p / kPairsPerBlock * R * 32;
      prefetch_ahead<R * 32>(block);
      for (int r = 0; r < R; ++r) {
        const __m512i q = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + r * 32)));
        if constexpr (Bits == 8) {
          for (int m = 0; m < M; ++m) acc[m][r] = _mm512_dpwssd_epi32(acc[m][r], q, _mm512_set1_epi32(x[m][p]));
        } else {
          const __m512i first = _mm512_and_si512(q, nibble), second = _mm512_srli_epi16(q, 4);
          for (int m = 0; m < M; ++m) {
            acc[m][r] = _mm512_dpwssd_epi32(acc[m][r], first, _mm512_set1_epi32(x[m][p]));
            acc[m][r] = _mm512_dpwssd_epi32(acc[m][r], second, _mm512_set1_epi32(x[m][p + 1]));
          }
        }
      }
    }
    const int64_t g = b * block_size / group;
    for (int r = 0; r < R; ++r) {
      const __m512 s = _mm512_loadu_ps(scales + (g * R + r) * 16), z = _mm512_loadu_ps(zeros + (g * R + r) * 16);
      for (int m = 0; m < M; ++m) {
        const __m512 sums = _mm512_fnmadd_ps(z, _mm512_set1_ps(xinfo[m][2 * b + 1]), _mm512_cvtepi32_ps(acc[m][r]));
        total[m][r] = _mm512_fmadd_ps(_mm512_mul_ps(s, _mm512_set1_ps(xinfo[m][2 * b])), sums, total[m][r]);
      }
    }
  }
  for (int m = 0; m < M; ++m) done(m, total[m]);
}

// 32 float8 e4m3 bytes (16 rows of a column pair) as the bf16 pairs vdpbf16ps takes, exactly: the byte's sign,
// exponent and mantissa moved into bf16's places and the exponent rebased (7 -> 127). vdpbf16ps treats denormal
// inputs as zero, so e4m3's subnormals (below 2^-6 of the scale) are read as zero: the weight's largest values are
// 448 x the scale, these lie below 1/28672 of them.
inline __m512bh fp8_pairs(const uint8_t* bytes) {
  const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes));
  const __m512i v = _mm512_slli_epi16(_mm512_cvtepi8_epi16(packed), 4);  // sign 11-15, exponent 7-10, mantissa 4-6
  const __mmask32 normal = _mm512_test_epi16_mask(v, _mm512_set1_epi16(0x0780));
  return (__m512bh)_mm512_maskz_add_epi16(normal, _mm512_and_si512(v, _mm512_set1_epi16(static_cast<int16_t>(0x87F0))),
                                          _mm512_set1_epi16(120 << 7));
}

// tile_pass for a tile of float8 e4m3 bytes (quant_tiles' 8-bit layout) with a scale per row and group of `group`
// columns: w = s fp8(q). Each group's sums are taken in bf16 products as tile_pass does, then scaled into the total.
template <int R, int M, typename Done>
void fp8_tile_pass(const int32_t* const* x, int64_t k, int64_t group, const uint8_t* w, const float* scales,
                   Done& done) {
  __m512 total[M][R], acc[M][R];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) total[m][r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < k / group; ++g) {
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
    for (int64_t p = g * group / 2; p < (g + 1) * group / 2; ++p) {
      prefetch_ahead<R * 32>(w + p * R * 32);
      __m512bh wv[R];
      for (int r = 0; r < R; ++r) wv[r] = fp8_pairs(w + (p * R + r) * 32);
      for (int m = 0; m < M; ++m) {
        const __m512bh xv = (__m512bh)_mm512_set1_epi32(x[m][p]);
        for (int r = 0; r < R; ++r) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], wv[r], xv);
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m512 s = _mm512_loadu_ps(scales + (g * R + r) * 16);
      for (int m = 0; m < M; ++m) total[m][r] = _mm512_fmadd_ps(s, acc[m][r], total[m][r]);
    }
  }
  for (int m = 0; m < M; ++m) done(m, total[m]);
}

// A weight [rows, k] in bf16 tiles (to_tiles). tile(first, rows, x, sums, n, done): done(m, sums) for each of the n
// tokens x[m] against the tile of `rows` rows from row `first`.
struct Bf16Weight {
  static constexpr bool kQuantized = false;
  const at::BFloat16* w;
  int64_t k;

  template <typename Done>
  void tile(int64_t first, int64_t rows, const int32_t* const* x, const float* const*, int64_t n, Done&& done) const {
    const int32_t* t = reinterpret_cast<const int32_t*>(w + first * k);
    with_rows(rows, [&](auto r) {
      in_passes<kMaxTokens>(n, [&](auto m, int64_t t0) {
        auto at = [&](int i, const __m512* s) { done(t0 + i, s); };
        tile_pass<decltype(r)::value, decltype(m)::value>(x + t0, k / 2, t, at);
      });
    });
  }
};

// A weight [rows, k] of Bits-bit integers in tiles (quant_tiles), scales and zero points tile by tile: each tile's
// [k / group, its rows] in one run (QuantTiles in cpu_kernels.py), so that a tile's scales stream in with it
// rather than as a scattered read per group (a cache miss each, which made decoding from DRAM latency-bound).
// tile() also takes each token's column sums per group.
template <int Bits>
struct QuantWeight {
  static constexpr bool kQuantized = true;
  const uint8_t* q;
  const float* scales;
  const float* zeros;
  int64_t k, group;

  template <typename Done>
  void tile(int64_t first, int64_t rows, const int32_t* const* x, const float* const* sums, int64_t n,
            Done&& done) const {
    const uint8_t* t = q + first * k * Bits / 8;
    const int64_t offset = first * (k / group);  // where the tile's scales begin
    with_rows(rows, [&](auto r) {
      in_passes<kMaxQuantTokens>(n, [&](auto m, int64_t t0) {
        auto at = [&](int i, const __m512* s) { done(t0 + i, s); };
        quant_tile_pass<Bits, decltype(r)::value, decltype(m)::value>(
            x + t0, sums + t0, k, group, quant_block(group), t, scales + offset, zeros + offset, at);
      });
    });
  }
};

// A weight [rows, k] of float8 e4m3 bytes in tiles (quant_tiles, 8 bits) with scales tile by tile (as QuantWeight's);
// the activations stay bf16.
struct Fp8Weight {
  static constexpr bool kQuantized = false;
  const uint8_t* q;
  const float* scales;
  int64_t k, group;

  template <typename Done>
  void tile(int64_t first, int64_t rows, const int32_t* const* x, const float* const*, int64_t n, Done&& done) const {
    const uint8_t* t = q + first * k;
    const float* s = scales + first * (k / group);
    with_rows(rows, [&](auto r) {
      in_passes<kMaxQuantTokens>(n, [&](auto m, int64_t t0) {
        auto at = [&](int i, const __m512* s) { done(t0 + i, s); };
        fp8_tile_pass<decltype(r)::value, decltype(m)::value>(x + t0, k, group, t, s, at);
      });
    });
  }
};

inline void store_bf16(at::BFloat16* out, __m512 v, __mmask16 lanes = 0xffff) {
  _mm256_mask_storeu_epi16(out, lanes, (__m256i)_mm512_cvtneps_pbh(v));
}

// A buffer of bf16 rows starting on 64-byte boundaries.
struct AlignedBF16 {
  explicit AlignedBF16(int64_t n) : lanes((n + 31) / 32) {}
  at::BFloat16* data() { return reinterpret_cast<at::BFloat16*>(lanes.data()); }
  std::vector<__m512i> lanes;
};

const int32_t* pairs_of(const at::BFloat16* row) { return reinterpret_cast<const int32_t*>(row); }

// A row of bf16 activations as int16 for quant_tile_pass: per block of `block` columns, x = 2^e xq with e such
// that the block's largest |x| is below 2^15 (a power of two: the larger values, whose 8 significant bits fit,
// are exact), and info = (2^e, sum xq) per block.
void quantize_row(const at::BFloat16* row, int64_t k, int64_t block, int16_t* xq, float* info) {
  for (int64_t b = 0; b < k / block; ++b) {
    const at::BFloat16* x = row + b * block;
    __m512 top = _mm512_setzero_ps();
    for (int64_t c = 0; c < block; c += 16) top = _mm512_max_ps(top, _mm512_abs_ps(load16(x + c)));
    int exponent = 0;
    std::frexp(_mm512_reduce_max_ps(top), &exponent);  // largest |x| < 2^exponent
    const __m512 up = _mm512_set1_ps(std::ldexp(1.0f, 15 - exponent));
    __m512i sum = _mm512_setzero_si512();
    for (int64_t c = 0; c < block; c += 16) {
      const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(load16(x + c), up));  // rounds to nearest
      sum = _mm512_add_epi32(sum, v);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(xq + b * block + c), _mm512_cvtsepi32_epi16(v));
    }
    info[2 * b] = std::ldexp(1.0f, exponent - 15);
    info[2 * b + 1] = static_cast<float>(_mm512_reduce_add_epi32(sum));
  }
}

// The int16 form of `count` rows (row(i) gives row i) where the weight W is quantized: `rows` and `infos` are pointed
// at each row's int16 column pairs and block info (their storage is returned); unquantized weights read the rows as
// they are.
struct QuantizedRows {
  std::vector<int16_t> values;
  std::vector<float> info;
};

template <typename W, typename Row>
QuantizedRows quantize_rows_for(const W& weight, int64_t count, Row row, std::vector<const int32_t*>& rows,
                                std::vector<const float*>& infos) {
  QuantizedRows out;
  if constexpr (W::kQuantized) {
    const int64_t k = weight.k, block = quant_block(weight.group), blocks = k / block;
    out.values.resize(count * k);
    out.info.resize(count * 2 * blocks);
    at::parallel_for(0, count, 16, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i)
        quantize_row(row(i), k, block, out.values.data() + i * k, out.info.data() + i * 2 * blocks);
    });
    for (int64_t i = 0; i < count; ++i) {
      rows[i] = reinterpret_cast<const int32_t*>(out.values.data() + i * k);
      infos[i] = out.info.data() + i * 2 * blocks;
    }
  }
  return out;
}

// The checks that every fused_moe takes: x [T, D] bf16, expert ids and routing weights [T, K].
void check_routing(const torch::Tensor& x, const torch::Tensor& expert_ids, const torch::Tensor& weights) {
  TORCH_CHECK(x.dim() == 2 && expert_ids.dim() == 2 && weights.dim() == 2,
              "fused_moe takes x [T, D], expert_ids and weights [T, K]");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, "fused_moe takes bfloat16 activations");
  TORCH_CHECK(is_integer(expert_ids) && at::isFloatingType(weights.scalar_type()),
              "fused_moe takes integer expert ids and floating-point weights");
  TORCH_CHECK(expert_ids.size(0) == x.size(0) && weights.sizes() == expert_ids.sizes(),
              "fused_moe needs an expert id and a weight for each of the K slots of each token");
}

// The MoE feed-forward of fused_moe for experts whose w13 and w2 are w13_of(e) and w2_of(e) (Bf16Weight or
// QuantWeight), num_experts of `inter` units each.
template <typename Of13, typename Of2>
torch::Tensor moe(torch::Tensor x, torch::Tensor expert_ids, torch::Tensor weights, int64_t num_experts,
                  int64_t inter, Of13 w13_of, Of2 w2_of, bool float_out) {
  const int64_t tokens = x.size(0), dim = x.size(1), top_k = expert_ids.size(1);
  if (tokens == 0) return torch::empty({0, dim}, x.options().dtype(float_out ? at::kFloat : at::kBFloat16));
  x = x.contiguous();
  expert_ids = of_type(expert_ids, at::kLong).contiguous();
  weights = of_type(weights, at::kFloat).contiguous();
  const int64_t* ids = expert_ids.data_ptr<int64_t>();
  const float* mix = weights.data_ptr<float>();

  // pairs (token * K + k) grouped by expert: expert e's are order[start[e], start[e + 1]); id -1 routes nowhere
  std::vector<int64_t> start(num_experts + 1, 0);
  for (int64_t p = 0; p < tokens * top_k; ++p) {
    TORCH_CHECK(ids[p] >= -1 && ids[p] < num_experts, "expert id out of range");
    if (ids[p] >= 0) ++start[ids[p] + 1];
  }
  std::vector<int64_t> active;
  for (int64_t e = 0; e < num_experts; ++e) {
    if (start[e + 1]) active.push_back(e);
    start[e + 1] += start[e];
  }
  std::vector<int64_t> fill(start.begin(), start.end() - 1), order(start[num_experts]);
  for (int64_t p = 0; p < tokens * top_k; ++p)
    if (ids[p] >= 0) order[fill[ids[p]]++] = p;

  const at::BFloat16* xp = x.data_ptr<at::BFloat16>();
  const int64_t pairs = static_cast<int64_t>(order.size());
  std::vector<const int32_t*> x_rows(pairs), act_rows(pairs);
  AlignedBF16 act(pairs * inter);  // SwiGLU output of each pair, by expert
  for (int64_t i = 0; i < pairs; ++i) {
    x_rows[i] = pairs_of(xp + order[i] / top_k * dim);
    act_rows[i] = pairs_of(act.data() + i * inter);
  }
  // quantized experts read int16 activations: each token's once, its pairs point there
  std::vector<const int32_t*> x_tokens(tokens);
  std::vector<const float*> x_token_info(tokens), x_info(pairs), act_info(pairs);
  const auto x_quantized = quantize_rows_for(w13_of(0), tokens, [&](int64_t t) { return xp + t * dim; }, x_tokens,
                                             x_token_info);
  if (!x_quantized.values.empty())
    for (int64_t i = 0; i < pairs; ++i) {
      x_rows[i] = x_tokens[order[i] / top_k];
      x_info[i] = x_token_info[order[i] / top_k];
    }
  const int64_t n_active = static_cast<int64_t>(active.size());

  // gate and up: tile u of every active expert (kTileUnits intermediate units, the last may have 16), tile-major so
  // that each thread takes a range of tiles of every expert
  const int64_t unit_tiles = (inter + kTileUnits - 1) / kTileUnits;
  at::parallel_for(0, unit_tiles * n_active, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t u = i / n_active, e = active[i % n_active];
      const int64_t units = std::min(kTileUnits, inter - kTileUnits * u);
      const int64_t first = start[e];
      w13_of(e).tile(kTileRows * u, 2 * units, x_rows.data() + first, x_info.data() + first, start[e + 1] - first,
                     [&](int64_t m, const __m512* s) {
        at::BFloat16* out = act.data() + (first + m) * inter + kTileUnits * u;
        for (int64_t h = 0; h < units / 16; ++h) {
          const __m512 gate = s[h], up = s[units / 16 + h];
          const __m512 e_minus = exp16(_mm512_sub_ps(_mm512_setzero_ps(), gate));
          const __m512 silu = _mm512_div_ps(gate, _mm512_add_ps(_mm512_set1_ps(1.0f), e_minus));
          store_bf16(out + 16 * h, _mm512_mul_ps(silu, up));
        }
      });
    }
  });
  const auto act_quantized = quantize_rows_for(w2_of(0), pairs, [&](int64_t i) { return act.data() + i * inter; },
                                               act_rows, act_info);

  // down: each thread owns a range of output tiles, for every expert: it adds each pair's rows into its token's
  // sums, then writes the tile's rows out (float32 sums, or rounded to bf16)
  auto result = torch::empty({tokens, dim}, x.options().dtype(float_out ? at::kFloat : at::kBFloat16));
  float* out_float = float_out ? result.data_ptr<float>() : nullptr;
  at::BFloat16* out_bf16 = float_out ? nullptr : result.data_ptr<at::BFloat16>();
  at::parallel_for(0, (dim + kTileRows - 1) / kTileRows, 1, [&](int64_t j0, int64_t j1) {
    std::vector<float> sums;  // [tokens, kTileRows]
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t rows = std::min(kTileRows, dim - j * kTileRows);
      sums.assign(tokens * kTileRows, 0.0f);
      for (const int64_t e : active) {
        const int64_t first = start[e];
        w2_of(e).tile(j * kTileRows, rows, act_rows.data() + first, act_info.data() + first, start[e + 1] - first,
                      [&](int64_t m, const __m512* s) {
          const int64_t pair = order[first + m];
          float* o = sums.data() + pair / top_k * kTileRows;
          const __m512 scale = _mm512_set1_ps(mix[pair]);
          for (int64_t r = 0; r < rows / 16; ++r)
            _mm512_storeu_ps(o + 16 * r, _mm512_add_ps(_mm512_mul_ps(scale, s[r]), _mm512_loadu_ps(o + 16 * r)));
        });
      }
      for (int64_t t = 0; t < tokens; ++t)
        for (int64_t r = 0; r < rows / 16; ++r) {
          const __m512 v = _mm512_loadu_ps(sums.data() + t * kTileRows + 16 * r);
          const int64_t at = t * dim + j * kTileRows + 16 * r;
          if (out_float)
            _mm512_storeu_ps(out_float + at, v);
          else
            store_bf16(out_bf16 + at, v);
        }
    }
  });
  return result;
}

// x [T, K] @ w^T -> [T, n] bf16 for a weight W of `padded` rows (n rounded up to 16, the extra rows zero).
template <typename W>
torch::Tensor linear(torch::Tensor x, const W& weight, int64_t n, int64_t padded) {
  const int64_t tokens = x.size(0), k = x.size(1);
  auto y = torch::empty({tokens, n}, x.options());
  if (tokens == 0) return y;
  x = x.contiguous();
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  const at::BFloat16* xp = x.data_ptr<at::BFloat16>();
  std::vector<const int32_t*> rows(tokens);
  for (int64_t t = 0; t < tokens; ++t) rows[t] = pairs_of(xp + t * k);
  std::vector<const float*> row_info(tokens);
  const auto quantized = quantize_rows_for(weight, tokens, [&](int64_t t) { return xp + t * k; }, rows, row_info);
  at::parallel_for(0, (padded + kTileRows - 1) / kTileRows, 1, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t first = j * kTileRows, count = std::min(kTileRows, padded - first);
      weight.tile(first, count, rows.data(), row_info.data(), tokens, [&](int64_t m, const __m512* s) {
        for (int64_t r = 0; r < count / 16; ++r) {
          const int64_t row = first + 16 * r, left = std::min<int64_t>(16, n - row);
          if (left > 0) store_bf16(yp + m * n + row, s[r], static_cast<__mmask16>((1u << left) - 1));
        }
      });
    }
  });
  return y;
}

// The group size of quantized weights [.., rows, k * bits / 8] with scales and zero points [.., k / group, rows].
int64_t checked_group(const char* kernel, const torch::Tensor& q, const torch::Tensor& scales,
                      const torch::Tensor& zeros, int64_t bits, int64_t k) {
  TORCH_CHECK(bits == 4 || bits == 8, kernel, " takes 4- or 8-bit weights");
  TORCH_CHECK(q.scalar_type() == at::kByte && q.is_contiguous() && q.size(-1) * 8 == k * bits, kernel,
              " takes contiguous uint8 weights of k * bits / 8 bytes a row");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && zeros.scalar_type() == at::kFloat && scales.is_contiguous() &&
              zeros.is_contiguous() && scales.sizes() == zeros.sizes() && scales.dim() == q.dim(), kernel,
              " takes contiguous float32 scales and zero points of one shape [.., groups, rows]");
  TORCH_CHECK(scales.size(-1) == q.size(-2) && scales.size(-2) > 0 && k % scales.size(-2) == 0, kernel,
              " needs scales and zero points [.., k / group, rows] for the weight's rows");
  const int64_t group = k / scales.size(-2);
  TORCH_CHECK(group % 16 == 0, kernel, " needs a group size that is a multiple of 16");
  for (int64_t d = 0; d + 2 < q.dim(); ++d)
    TORCH_CHECK(scales.size(d) == q.size(d), kernel, " needs scales and zero points for each matrix");
  return group;
}

}  // namespace

// x [T, D] bf16; expert_ids [T, K] int64 (-1: the pair adds nothing); weights [T, K] float32; w13 [E, 2I, D]
// bf16 in tiles of 32 gate rows and their 32 up rows; w2 [E, D, I] bf16 in tiles of 64 rows
// (layers/cpu_kernels.py makes both). Returns
// sum_k weights[t, k] * expert_{ids[t, k]}(x[t]) as [T, D] bf16, or as the float32 sums with float_out. Each pair's
// weighted output is rounded to float32 before it is added (a multiply, then an add: no fused multiply-add), so for
// top-2 the sum is the same whether both pairs run in one call or in two whose float32 results are then added (the
// expert cache's waves, experts/offload.py): round(round(a) + round(b)) either way.
torch::Tensor fused_moe(torch::Tensor x, torch::Tensor expert_ids, torch::Tensor weights, torch::Tensor w13,
                        torch::Tensor w2, bool float_out) {
  check_on_cpu("fused_moe", {&x, &expert_ids, &weights, &w13, &w2});
  check_routing(x, expert_ids, weights);
  TORCH_CHECK(w13.dim() == 3 && w2.dim() == 3, "fused_moe takes w13 [E, 2I, D] and w2 [E, D, I]");
  TORCH_CHECK(w13.scalar_type() == at::kBFloat16 && w2.scalar_type() == at::kBFloat16,
              "fused_moe takes bfloat16 weights");
  TORCH_CHECK(w13.is_contiguous() && w2.is_contiguous(), "fused_moe needs contiguous expert weights");
  const int64_t dim = x.size(1), num_experts = w13.size(0), inter = w2.size(2);
  TORCH_CHECK(w13.size(1) == 2 * inter && w13.size(2) == dim && w2.size(0) == num_experts && w2.size(1) == dim,
              "fused_moe expert weights do not match x or each other: w13 [E, 2I, D], w2 [E, D, I]");
  TORCH_CHECK(dim > 0 && inter > 0 && dim % 16 == 0 && inter % 16 == 0,
              "fused_moe needs hidden and expert sizes that are positive multiples of 16");
  const at::BFloat16* w13p = w13.data_ptr<at::BFloat16>();
  const at::BFloat16* w2p = w2.data_ptr<at::BFloat16>();
  return moe(x, expert_ids, weights, num_experts, inter,
             [&](int64_t e) { return Bf16Weight{w13p + e * 2 * inter * dim, dim}; },
             [&](int64_t e) { return Bf16Weight{w2p + e * dim * inter, inter}; }, float_out);
}

// fused_moe on experts of unsigned integers in tiles (quant_tiles, rows ordered as fused_moe's), w13 [E, 2I, D bits13
// / 8] and w2 [E, D, I bits2 / 8] uint8 (8 or 4 bits each), each with float32 scales and zero points per group of
// columns, [E, D / group, 2I] and [E, I / group, D]: w = scale (q - zero). With float8 the bytes (8 bits) are float8
// e4m3 numbers and w = scale fp8(q) (the zero points are not read).
torch::Tensor fused_moe_quant(torch::Tensor x, torch::Tensor expert_ids, torch::Tensor weights, torch::Tensor w13,
                              torch::Tensor s13, torch::Tensor z13, torch::Tensor w2, torch::Tensor s2,
                              torch::Tensor z2, int64_t bits13, int64_t bits2, bool float8, bool float_out) {
  check_on_cpu("fused_moe_quant", {&x, &expert_ids, &weights, &w13, &s13, &z13, &w2, &s2, &z2});
  check_routing(x, expert_ids, weights);
  TORCH_CHECK(w13.dim() == 3 && w2.dim() == 3 && w2.size(0) == w13.size(0) && w2.size(1) == x.size(1) &&
              w13.size(1) % 32 == 0 && w13.size(1) > 0 && x.size(1) % 16 == 0 && x.size(1) > 0,
              "fused_moe_quant takes w13 [E, 2I, D bits13 / 8] and w2 [E, D, I bits2 / 8], D and I multiples of 16");
  const int64_t dim = x.size(1), num_experts = w13.size(0), inter = w13.size(1) / 2;
  const int64_t group13 = checked_group("fused_moe_quant", w13, s13, z13, bits13, dim);
  const int64_t group2 = checked_group("fused_moe_quant", w2, s2, z2, bits2, inter);
  const uint8_t *q13 = w13.data_ptr<uint8_t>(), *q2 = w2.data_ptr<uint8_t>();
  const float *sc13 = s13.data_ptr<float>(), *ze13 = z13.data_ptr<float>();
  const float *sc2 = s2.data_ptr<float>(), *ze2 = z2.data_ptr<float>();
  const int64_t size13 = 2 * inter * dim, size2 = dim * inter;  // values per expert
  auto run = [&](auto of13, auto of2) { return moe(x, expert_ids, weights, num_experts, inter, of13, of2, float_out); };
  auto experts = [&](auto bits13_constant, auto bits2_constant) {
    constexpr int B13 = decltype(bits13_constant)::value, B2 = decltype(bits2_constant)::value;
    return run([&](int64_t e) {
      return QuantWeight<B13>{q13 + e * size13 * B13 / 8, sc13 + e * size13 / group13, ze13 + e * size13 / group13,
                              dim, group13};
    }, [&](int64_t e) {
      return QuantWeight<B2>{q2 + e * size2 * B2 / 8, sc2 + e * size2 / group2, ze2 + e * size2 / group2, inter,
                             group2};
    });
  };
  if (float8) {
    TORCH_CHECK(bits13 == 8 && bits2 == 8, "fused_moe_quant: float8 weights have 8 bits");
    return run(
        [&](int64_t e) { return Fp8Weight{q13 + e * size13, sc13 + e * size13 / group13, dim, group13}; },
        [&](int64_t e) { return Fp8Weight{q2 + e * size2, sc2 + e * size2 / group2, inter, group2}; });
  }
  using Eight = std::integral_constant<int, 8>;
  using Four = std::integral_constant<int, 4>;
  if (bits13 == 8) return bits2 == 8 ? experts(Eight{}, Eight{}) : experts(Eight{}, Four{});
  return bits2 == 8 ? experts(Four{}, Eight{}) : experts(Four{}, Four{});
}

// weight [..., rows, k] of a 2-byte dtype (k even) -> the same numbers in tiles (layers/cpu_kernels.py, to_tiles):
// each run of kTileRows rows (the last may be shorter) as [k / 2][rows][2]. A column pair is one 4-byte element,
// so a tile is a transpose of 4-byte elements: its rows are read 16 pairs (a cache line each) at a time. Offloaded
// experts are laid out on every load; PyTorch's strided copy took ~9 ms for an 11 MB weight.
torch::Tensor to_tiles(torch::Tensor weight) {
  check_on_cpu("to_tiles", {&weight});
  TORCH_CHECK(weight.element_size() == 2 && weight.dim() >= 2 && weight.size(-1) % 2 == 0,
              "to_tiles takes a weight [..., rows, k] of a 2-byte dtype with k even");
  weight = weight.contiguous();
  auto out = torch::empty_like(weight);
  const int64_t rows = weight.size(-2), pairs = weight.size(-1) / 2;
  const int64_t mats = rows * pairs ? weight.numel() / (rows * pairs * 2) : 0;
  const int64_t tiles = (rows + kTileRows - 1) / kTileRows;
  const int32_t* in = static_cast<const int32_t*>(weight.data_ptr());
  int32_t* tiled = static_cast<int32_t*>(out.data_ptr());
  at::parallel_for(0, mats * tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t first = t / tiles * rows + t % tiles * kTileRows;  // the tile's first row over all matrices
      const int64_t n = std::min(kTileRows, rows - t % tiles * kTileRows);
      const int32_t* src = in + first * pairs;
      int32_t* dst = tiled + first * pairs;
      for (int64_t p = 0; p < pairs; ++p)
        for (int64_t r = 0; r < n; ++r) dst[p * n + r] = src[r * pairs + p];
    }
  });
  return out;
}

// values [..., rows, k] uint8, each an unsigned integer of `bits` bits (rows a multiple of 16, k of 4) -> the tiles
// quant_tile_pass reads, [..., rows, k bits / 8] uint8: in each run of kTileRows rows (n of them), the 32 bytes of
// 16 rows of a column pair (int8) or of two (int4: pair 2b in the low nibbles, 2b + 1 in the high ones), so that
// byte 2r + c of block b holds row r, column 2b + c [and 2b + 2 + c]: at b * 2n + 2r + c of the tile.
torch::Tensor quant_tiles(torch::Tensor values, int64_t bits) {
  check_on_cpu("quant_tiles", {&values});
  TORCH_CHECK(bits == 4 || bits == 8, "quant_tiles takes 4- or 8-bit values");
  TORCH_CHECK(values.scalar_type() == at::kByte && values.dim() >= 2 && values.size(-1) % 4 == 0 &&
              values.size(-2) % 16 == 0, "quant_tiles takes uint8 values [..., rows, k], rows a multiple of 16 and "
              "k of 4");
  values = values.contiguous();
  std::vector<int64_t> shape = values.sizes().vec();
  const int64_t rows = shape.back() ? values.size(-2) : 0, k = values.size(-1);
  shape.back() = k * bits / 8;
  auto out = torch::empty(shape, values.options());
  const int64_t mats = rows * k ? values.numel() / (rows * k) : 0, tiles = (rows + kTileRows - 1) / kTileRows;
  const int64_t per_block = bits == 8 ? 2 : 4;  // columns a block of 16 rows holds
  const uint8_t* in = values.data_ptr<uint8_t>();
  uint8_t* tiled = out.data_ptr<uint8_t>();
  at::parallel_for(0, mats * tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t first = t / tiles * rows + t % tiles * kTileRows;
      const int64_t n = std::min(kTileRows, rows - t % tiles * kTileRows);
      const uint8_t* src = in + first * k;
      uint8_t* dst = tiled + first * k * bits / 8;
      for (int64_t b = 0; b < k / per_block; ++b)
        for (int64_t r = 0; r < n; ++r)
          for (int64_t c = 0; c < 2; ++c) {
            const uint8_t* v = src + r * k + b * per_block + c;
            TORCH_CHECK(v[0] >> bits == 0 && (bits == 8 || v[2] >> bits == 0), "quant_tiles: a value has more than ",
                        bits, " bits");
            dst[b * 2 * n + 2 * r + c] = bits == 8 ? v[0] : static_cast<uint8_t>(v[0] | v[2] << 4);
          }
    }
  });
  return out;
}

// x [T, K] @ w^T -> [T, N] bf16, float32 sums; w is [N', K] in tiles of 64 rows (N' is N rounded up to 16, the
// extra rows zero): a linear layer at decode batch sizes, where reading the weight is the whole cost.
torch::Tensor tiled_linear(torch::Tensor x, torch::Tensor w, int64_t n) {
  check_on_cpu("tiled_linear", {&x, &w});
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2, "tiled_linear takes x [T, K] and a weight [N', K] in tiles");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16 && w.is_contiguous(),
              "tiled_linear takes bfloat16 input and a contiguous bfloat16 weight");
  TORCH_CHECK(n >= 0 && w.size(0) == (n + 15) / 16 * 16 && w.size(1) % 2 == 0 && x.size(1) == w.size(1),
              "tiled_linear needs x's inner size even and equal to the weight's, and the weight's rows n rounded "
              "up to a multiple of 16");
  return linear(x, Bf16Weight{w.data_ptr<at::BFloat16>(), w.size(1)}, n, w.size(0));
}

// tiled_linear on a weight [N', K bits / 8] of `bits`-bit integers in tiles (quant_tiles) with float32 scales and
// zero points [K / group, N']: w = scale (q - zero); with float8, of float8 e4m3 bytes: w = scale fp8(q).
torch::Tensor tiled_linear_quant(torch::Tensor x, torch::Tensor w, torch::Tensor scales, torch::Tensor zeros,
                                 int64_t bits, bool float8, int64_t n) {
  check_on_cpu("tiled_linear_quant", {&x, &w, &scales, &zeros});
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.size(1) % 16 == 0,
              "tiled_linear_quant takes bfloat16 x [T, K], K a multiple of 16, and a weight [N', K bits / 8]");
  TORCH_CHECK(n >= 0 && w.size(0) == (n + 15) / 16 * 16, "tiled_linear_quant needs the weight's rows n rounded up to "
              "a multiple of 16");
  const int64_t k = x.size(1), group = checked_group("tiled_linear_quant", w, scales, zeros, bits, k);
  const uint8_t* q = w.data_ptr<uint8_t>();
  const float *s = scales.data_ptr<float>(), *z = zeros.data_ptr<float>();
  TORCH_CHECK(!float8 || bits == 8, "tiled_linear_quant: float8 weights have 8 bits");
  if (float8) return linear(x, Fp8Weight{q, s, k, group}, n, w.size(0));
  return bits == 8 ? linear(x, QuantWeight<8>{q, s, z, k, group}, n, w.size(0))
                   : linear(x, QuantWeight<4>{q, s, z, k, group}, n, w.size(0));
}
