// Rotary position embedding (Su et al. 2021) of a step's query and key heads in one call, for CPUs. In PyTorch
// it is a multiply, a roll (itself a slice and a concatenation) and an addcmul, each a pass with its own
// output; at decode batch sizes their per-op cost is the whole cost.
// Rounding follows that PyTorch path: x * cos is rounded to x's dtype, then the rotated half times the signed
// sine is added to it by a fused multiply-add in float32 and rounded once.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>

#include "simd_math.h"
#include "tensor_args.h"

namespace {

// float32 lanes rounded to T and back, and stored as T (bf16 rounded to nearest even, as PyTorch's conversion
// does)
inline __m512 round_to(float*, __m512 v) { return v; }
inline __m512 round_to(at::BFloat16*, __m512 v) {
  const __m512i wide = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(at::BFloat16* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(v));
}

template <typename T>
void rotate(const torch::Tensor& x, const T* cos, const T* signed_sin, T* out) {
  const int64_t tokens = x.size(0), heads = x.size(1), dim = x.size(2), half = dim / 2;
  const int64_t token_stride = x.stride(0), head_stride = x.stride(1);
  const bool vector = half % 16 == 0;  // 16-lane chunks then never straddle the two halves
  const T* xp = x.data_ptr<T>();
  at::parallel_for(0, tokens * heads, std::max<int64_t>(1, 16384 / dim), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t t = r / heads, h = r % heads;
      const T* row = xp + t * token_stride + h * head_stride;
      const T* c = cos + t * dim;
      const T* s = signed_sin + t * dim;
      T* o = out + r * dim;
      if (vector) {
        for (int64_t i = 0; i < dim; i += 16) {
          const __m512 scaled = round_to(o, _mm512_mul_ps(load16(row + i), load16(c + i)));
          store16(o + i, _mm512_fmadd_ps(load16(row + (i + half) % dim), load16(s + i), scaled));
        }
        continue;
      }
      for (int64_t i = 0; i < dim; ++i) {
        const T scaled = static_cast<T>(static_cast<float>(row[i]) * static_cast<float>(c[i]));
        const float rolled = static_cast<float>(row[(i + half) % dim]);
        o[i] = static_cast<T>(std::fma(rolled, static_cast<float>(s[i]), static_cast<float>(scaled)));
      }
    }
  });
}

}  // namespace

// x [T, H, D] (each row contiguous, rows at any stride, e.g. the query and key heads of a merged projection);
// cos and signed_sin [T, D] in x's dtype: x * cos + roll(x, D/2) * signed_sin, as a new [T, H, D] tensor.
torch::Tensor rotary(torch::Tensor x, torch::Tensor cos, torch::Tensor signed_sin) {
  check_on_cpu("rotary", {&x, &cos, &signed_sin});
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.size(2) > 0 && x.size(2) % 2 == 0,
              "rotary takes x [T, H, D] with contiguous rows, D even");
  TORCH_CHECK(cos.scalar_type() == x.scalar_type() && signed_sin.scalar_type() == x.scalar_type(),
              "rotary needs its tables in x's dtype");
  TORCH_CHECK(cos.dim() == 2 && cos.size(0) == x.size(0) && cos.size(1) == x.size(2) &&
              signed_sin.sizes() == cos.sizes(), "rotary takes cos and signed_sin [T, D] for x [T, H, D]");
  cos = cos.contiguous();
  signed_sin = signed_sin.contiguous();
  auto out = torch::empty(x.sizes(), x.options());
  if (x.scalar_type() == at::kBFloat16)
    rotate<at::BFloat16>(x, cos.data_ptr<at::BFloat16>(), signed_sin.data_ptr<at::BFloat16>(),
                         out.data_ptr<at::BFloat16>());
  else if (x.scalar_type() == at::kFloat)
    rotate<float>(x, cos.data_ptr<float>(), signed_sin.data_ptr<float>(), out.data_ptr<float>());
  else
    TORCH_CHECK(false, "rotary takes bfloat16 or float32");
  return out;
}
