// How the CPU kernels take their tensor arguments.
#pragma once
#include <torch/extension.h>

#include <initializer_list>

// t in the given dtype; a tensor already in it is returned as is, without the dispatch a no-op .to() costs
// (a decode step passes ~100 arguments, each already of the right type).
inline torch::Tensor of_type(const torch::Tensor& t, at::ScalarType type) {
  return t.scalar_type() == type ? t : t.to(type);
}

// Every entry point refuses, with a Python RuntimeError, what it cannot read: checked before any memory is touched.
inline void check_on_cpu(const char* kernel, std::initializer_list<const torch::Tensor*> tensors) {
  for (const torch::Tensor* t : tensors) TORCH_CHECK(t->device().is_cpu(), kernel, " takes CPU tensors");
}

inline bool is_integer(const torch::Tensor& t) { return at::isIntegralType(t.scalar_type(), /*includeBool=*/false); }
