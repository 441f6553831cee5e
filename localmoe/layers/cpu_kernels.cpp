// The Python bindings of LocalMoE's CPU kernels, one extension built from the sources beside this file.
#include <torch/extension.h>

#include "cpu_kernels.h"

// Each kernel lets go of the GIL while it runs, as PyTorch's own ops do, so that the server's event loop can
// stream tokens meanwhile instead of waiting for the engine thread to reach a PyTorch op.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using release = pybind11::call_guard<pybind11::gil_scoped_release>;
  m.def("argmax_rows", &argmax_rows, "the first index of the largest value of each row", release());
  m.def("fused_moe", &fused_moe, "MoE feed-forward on experts in tiles, bf16, AVX512-BF16", release());
  m.def("fused_moe_quant", &fused_moe_quant, "fused_moe on 8- or 4-bit or float8 experts in tiles", release());
  m.def("paged_attention", &paged_attention, "one query token a row over the paged KV cache", release());
  m.def("rms_norm", &rms_norm, "RMSNorm of the last dimension, after a residual add", release());
  m.def("rotary", &rotary, "rotary position embedding of query and key heads", release());
  m.def("to_tiles", &to_tiles, "a weight in the tiles the matmul kernels read", release());
  m.def("quant_tiles", &quant_tiles, "8- or 4-bit integers in the tiles the quantized kernels read", release());
  m.def("tiled_linear", &tiled_linear, "x @ w.T on a weight in tiles, bf16, AVX512-BF16", release());
  m.def("tiled_linear_quant", &tiled_linear_quant, "tiled_linear on 8- or 4-bit or float8 weights in tiles", release());
  m.def("decoder_layers", &decoder_layers, "every decoder layer of a step, attention and MoE, in one call", release());
}
