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
#include <optional>
#include <vector>

#include "simd_math.h"
#include "tensor_args.h"

namespace {

constexpr int64_t kTileRows = 64;  // 4 registers of 16 row sums
constexpr int64_t kTileUnits = kTileRows / 2;  // an expert tile: this many gate rows, then their up rows
constexpr int64_t kMaxTokens = 6;  // 6 x 4 sums + 4 weight registers + the broadcast token fit the 32 registers

// done(m, sums) with the 16R row sums of token m, for the M tokens x[m] (rows as column pairs) against one tile of
// 16R rows, `pairs` = k / 2. The sums are locals so that they live in registers (as an output parameter they
// had been stored to memory every iteration).
template <int R, int M, typename Done>
void tile_pass(const int32_t* const* x, int64_t pairs, const int32_t* w, Done& done) {
  __m512 acc[M][R];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    __m512bh wv[R];
    for (int r = 0; r < R; ++r) wv[r] = (__m512bh)_mm512_loadu_si512(w + (p * R + r) * 16);
    for (int m = 0; m < M; ++m) {
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(x[m][p]);
      for (int r = 0; r < R; ++r) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], wv[r], xv);
    }
  }
  for (int m = 0; m < M; ++m) done(m, acc[m]);
}

// done(m, sums) for each of the n tokens x[m] against one tile of 16R rows, in passes of at most kMaxTokens
// tokens of near-equal size (the tile stays in L2 between passes).
template <int R, typename Done>
void tile(const int32_t* const* x, int64_t n, int64_t pairs, const int32_t* w, Done&& done) {
  if (n <= 0) return;  // no tokens, no passes (and no division by zero below)
  const int64_t passes = (n + kMaxTokens - 1) / kMaxTokens, size = (n + passes - 1) / passes;
  for (int64_t t0 = 0; t0 < n; t0 += size) {
    auto at = [&](int m, const __m512* sums) { done(t0 + m, sums); };
    switch (std::min(size, n - t0)) {
      case 1: tile_pass<R, 1>(x + t0, pairs, w, at); break;
      case 2: tile_pass<R, 2>(x + t0, pairs, w, at); break;
      case 3: tile_pass<R, 3>(x + t0, pairs, w, at); break;
      case 4: tile_pass<R, 4>(x + t0, pairs, w, at); break;
      case 5: tile_pass<R, 5>(x + t0, pairs, w, at); break;
      default: tile_pass<R, 6>(x + t0, pairs, w, at); break;
    }
  }
}

// tile() with R picked at run time from the tile's row count (16, 32, 48 or 64).
template <typename Done>
void tile_rows(int64_t rows, const int32_t* const* x, int64_t n, int64_t pairs, const int32_t* w, Done&& done) {
  switch (rows / 16) {
    case 1: tile<1>(x, n, pairs, w, done); break;
    case 2: tile<2>(x, n, pairs, w, done); break;
    case 3: tile<3>(x, n, pairs, w, done); break;
    default: tile<4>(x, n, pairs, w, done); break;
  }
}

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
  TORCH_CHECK(x.dim() == 2 && expert_ids.dim() == 2 && weights.dim() == 2 && w13.dim() == 3 && w2.dim() == 3,
              "fused_moe takes x [T, D], expert_ids and weights [T, K], w13 [E, 2I, D] and w2 [E, D, I]");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w13.scalar_type() == at::kBFloat16 &&
              w2.scalar_type() == at::kBFloat16, "fused_moe takes bfloat16 activations and weights");
  TORCH_CHECK(is_integer(expert_ids) && at::isFloatingType(weights.scalar_type()),
              "fused_moe takes integer expert ids and floating-point weights");
  TORCH_CHECK(w13.is_contiguous() && w2.is_contiguous(), "fused_moe needs contiguous expert weights");
  const int64_t tokens = x.size(0), dim = x.size(1), top_k = expert_ids.size(1);
  const int64_t num_experts = w13.size(0), inter = w2.size(2);
  TORCH_CHECK(expert_ids.size(0) == tokens && weights.sizes() == expert_ids.sizes(),
              "fused_moe needs an expert id and a weight for each of the K slots of each token");
  TORCH_CHECK(w13.size(1) == 2 * inter && w13.size(2) == dim && w2.size(0) == num_experts && w2.size(1) == dim,
              "fused_moe expert weights do not match x or each other: w13 [E, 2I, D], w2 [E, D, I]");
  TORCH_CHECK(dim > 0 && inter > 0 && dim % 16 == 0 && inter % 16 == 0,
              "fused_moe needs hidden and expert sizes that are positive multiples of 16");
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
  std::vector<const int32_t*> x_rows(order.size()), act_rows(order.size());
  AlignedBF16 act(static_cast<int64_t>(order.size()) * inter);  // SwiGLU output of each pair, by expert
  for (size_t i = 0; i < order.size(); ++i) {
    x_rows[i] = pairs_of(xp + order[i] / top_k * dim);
    act_rows[i] = pairs_of(act.data() + i * inter);
  }
  const int64_t n_active = static_cast<int64_t>(active.size());

  // gate and up: tile u of every active expert (kTileUnits intermediate units, the last may have 16), tile-major so
  // that each thread takes a range of tiles of every expert
  const at::BFloat16* w13p = w13.data_ptr<at::BFloat16>();
  const int64_t unit_tiles = (inter + kTileUnits - 1) / kTileUnits;
  at::parallel_for(0, unit_tiles * n_active, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t u = i / n_active, e = active[i % n_active];
      const int64_t units = std::min(kTileUnits, inter - kTileUnits * u);
      const int64_t first = start[e];
      const int32_t* w = pairs_of(w13p + (e * 2 * inter + kTileRows * u) * dim);
      tile_rows(2 * units, x_rows.data() + first, start[e + 1] - first, dim / 2, w, [&](int64_t m, const __m512* s) {
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

  // down: each thread owns a range of output tiles, for every expert: it adds each pair's rows into its token's
  // sums, then writes the tile's rows out (float32 sums, or rounded to bf16)
  auto result = torch::empty({tokens, dim}, x.options().dtype(float_out ? at::kFloat : at::kBFloat16));
  float* out_float = float_out ? result.data_ptr<float>() : nullptr;
  at::BFloat16* out_bf16 = float_out ? nullptr : result.data_ptr<at::BFloat16>();
  const at::BFloat16* w2p = w2.data_ptr<at::BFloat16>();
  at::parallel_for(0, (dim + kTileRows - 1) / kTileRows, 1, [&](int64_t j0, int64_t j1) {
    std::vector<float> sums;  // [tokens, kTileRows]
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t rows = std::min(kTileRows, dim - j * kTileRows);
      sums.assign(tokens * kTileRows, 0.0f);
      for (const int64_t e : active) {
        const int64_t first = start[e];
        const int32_t* w = pairs_of(w2p + (e * dim + j * kTileRows) * inter);
        tile_rows(rows, act_rows.data() + first, start[e + 1] - first, inter / 2, w, [&](int64_t m, const __m512* s) {
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
  const int64_t tokens = x.size(0), k = x.size(1), padded = w.size(0);
  auto y = torch::empty({tokens, n}, x.options());
  if (tokens == 0) return y;
  x = x.contiguous();
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  std::vector<const int32_t*> rows(tokens);
  for (int64_t t = 0; t < tokens; ++t) rows[t] = pairs_of(x.data_ptr<at::BFloat16>() + t * k);
  const at::BFloat16* wp = w.data_ptr<at::BFloat16>();
  at::parallel_for(0, (padded + kTileRows - 1) / kTileRows, 1, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t first = j * kTileRows, count = std::min(kTileRows, padded - first);
      tile_rows(count, rows.data(), tokens, k / 2, pairs_of(wp + first * k), [&](int64_t m, const __m512* s) {
        for (int64_t r = 0; r < count / 16; ++r) {
          const int64_t row = first + 16 * r, left = std::min<int64_t>(16, n - row);
          if (left > 0) store_bf16(yp + m * n + row, s[r], static_cast<__mmask16>((1u << left) - 1));
        }
      });
    }
  });
  return y;
}
