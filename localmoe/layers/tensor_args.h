// How the CPU kernels take their tensor arguments.
#pragma once
#include <torch/extension.h>

// t in the given dtype; a tensor already in it is returned as is, without the dispatch a no-op .to() costs
// (a decode step passes ~100 arguments, each already of the right type).
inline torch::Tensor of_type(const torch::Tensor& t, at::ScalarType type) {
  return t.scalar_type() == type ? t : t.to(type);
}
