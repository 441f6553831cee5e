// RMSNorm (Zhang & Sennrich 2019) in one call, for CPUs: PyTorch's CPU rms_norm on bfloat16 runs as
// about seventeen small ops, which at decode batch sizes cost more than the arithmetic.
// The rounding follows the reference implementation: the normalised row is rounded to the input's
// dtype, then multiplied by the weight. It also takes the residual add before the norm (one call for both).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <optional>
#include <vector>

#include "tensor_args.h"

namespace {

// out = RMSNorm(x [+ residual]) row by row; with a residual, x + residual (rounded to T, as PyTorch's add rounds
// it) goes to `sum` and is what is normalised.
template <typename T>
void rms_norm_impl(const T* x, const T* residual, const T* weight, T* out, T* sum, int64_t rows, int64_t dim,
                   double eps) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / dim), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* row = x + r * dim;
      if (residual) {
        for (int64_t d = 0; d < dim; ++d)
          sum[r * dim + d] = static_cast<T>(static_cast<float>(row[d]) + static_cast<float>(residual[r * dim + d]));
        row = sum + r * dim;
      }
      float squares = 0.0f;
      for (int64_t d = 0; d < dim; ++d) squares += static_cast<float>(row[d]) * static_cast<float>(row[d]);
      const float inverse = 1.0f / std::sqrt(squares / static_cast<float>(dim) + static_cast<float>(eps));
      for (int64_t d = 0; d < dim; ++d) {
        const T normalised = static_cast<T>(static_cast<float>(row[d]) * inverse);
        out[r * dim + d] = static_cast<T>(static_cast<float>(weight[d]) * static_cast<float>(normalised));
      }
    }
  });
}

template <typename T>
void run(const torch::Tensor& x, const std::optional<torch::Tensor>& residual, const torch::Tensor& weight,
         torch::Tensor& out, std::optional<torch::Tensor>& sum, double eps) {
  const int64_t dim = x.size(-1);
  rms_norm_impl(x.data_ptr<T>(), residual ? residual->data_ptr<T>() : nullptr, weight.data_ptr<T>(),
                out.data_ptr<T>(), sum ? sum->data_ptr<T>() : nullptr, x.numel() / dim, dim, eps);
}

}  // namespace

// x [..., D], weight [D] of x's dtype (bfloat16 or float32) -> [..., D]. With residual (x's shape and dtype),
// returns [RMSNorm(x + residual), x + residual]: the residual add of a pre-norm layer and the next norm in one call.
std::vector<torch::Tensor> rms_norm(torch::Tensor x, std::optional<torch::Tensor> residual, torch::Tensor weight,
                                    double eps) {
  check_on_cpu("rms_norm", {&x, &weight});
  if (residual) check_on_cpu("rms_norm", {&*residual});
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat, "rms_norm takes bfloat16 or float32");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, "rms_norm takes x [..., D] with D > 0");
  const int64_t dim = x.size(-1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == dim, "rms_norm takes a weight [D] for x [..., D]");
  x = x.contiguous();
  weight = of_type(weight, x.scalar_type()).contiguous();
  std::optional<torch::Tensor> sum;
  if (residual) {
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type(),
                "rms_norm residual must match the input");
    residual = residual->contiguous();
    sum = torch::empty_like(x);
  }
  auto out = torch::empty_like(x);
  if (x.scalar_type() == at::kBFloat16)
    run<at::BFloat16>(x, residual, weight, out, sum, eps);
  else
    run<float>(x, residual, weight, out, sum, eps);
  return sum ? std::vector<torch::Tensor>{out, *sum} : std::vector<torch::Tensor>{out};
}
