// Every decoder layer of a step in one call, for the common shape of an MoE model (Mixtral's): pre-norm attention
// (a merged q/k/v projection, rotary on query and key heads, attention over the paged cache, the output
// projection) then a pre-norm sparse MoE block (a softmax top-k router and SwiGLU experts in tiles), each matmul on
// bf16 tiles or on 8- or 4-bit or float8 ones.
//
// It calls the same kernels in the same order as the layers' Python code does, so its numbers are those of the
// Python path, bit for bit. What it removes is the path between the kernels: at one decode token the kernels of
// the 140M benchmark model read its weights in ~2.5 ms, and the Python around them (modules, views, the router's
// two small ops, the argument conversions of ~60 calls) added ~1 ms more; one call of this has none of that.
#include <torch/extension.h>

#include <cstdlib>
#include <vector>

#include "cpu_kernels.h"
#include "tensor_args.h"

namespace {

// A layer's tensors: input norm, qkv (3), o (3), post-attention norm, router, w13 (3), w2 (3). A matmul's weight
// takes three places: bf16 tiles and two unused, or the quantized tiles' q, scales and zeros.
constexpr size_t kWeightsPerLayer = 15;
constexpr int64_t kBFloat16 = 16;  // a matmul's format: bf16 tiles; else its bits (8, 4), negative for float8

torch::Tensor matmul(const torch::Tensor& x, const torch::Tensor* w, int64_t format, int64_t n) {
  if (format == kBFloat16) return tiled_linear(x, w[0], n);
  return tiled_linear_quant(x, w[0], w[1], w[2], std::abs(format), format < 0, n);
}

}  // namespace

// h [T, D] bf16 embeddings; positions [T]; cos_table and signed_sin_table [P, head dim] float32 (the rotary
// tables, layers/rotary.py); kv_caches one per layer; block_tables [T, W] and context [T] as paged_attention takes
// them (a row per token); weights: kWeightsPerLayer per layer; formats: 4 per layer, of qkv, o, w13 and w2 (w13 and
// w2 both float8 or neither); windows: each layer's sliding window (0: none).
// Returns [the final norm of the last hidden states [T, D], each layer's expert ids [L, T, K]].
std::vector<torch::Tensor> decoder_layers(torch::Tensor h, torch::Tensor positions, torch::Tensor cos_table,
                                          torch::Tensor signed_sin_table, std::vector<torch::Tensor> kv_caches,
                                          torch::Tensor block_tables, torch::Tensor context,
                                          std::vector<torch::Tensor> weights, std::vector<int64_t> formats,
                                          std::vector<int64_t> windows,
                                          int64_t heads, int64_t kv_heads, double scale, double eps, int64_t top_k,
                                          bool renormalize, torch::Tensor final_norm) {
  const size_t layers = kv_caches.size();
  TORCH_CHECK(layers > 0 && weights.size() == layers * kWeightsPerLayer && formats.size() == 4 * layers &&
                  windows.size() == layers,
              "decoder_layers takes ", kWeightsPerLayer, " weights, 4 formats and a window per layer");
  TORCH_CHECK(h.dim() == 2 && h.scalar_type() == at::kBFloat16, "decoder_layers takes bf16 hidden states [T, D]");
  check_on_cpu("decoder_layers", {&h, &positions, &cos_table, &signed_sin_table});
  const int64_t tokens = h.size(0), hidden = h.size(1), head_dim = cos_table.size(1);
  const torch::Tensor cos = cos_table.index_select(0, positions).to(at::kBFloat16);
  const torch::Tensor signed_sin = signed_sin_table.index_select(0, positions).to(at::kBFloat16);
  std::optional<torch::Tensor> residual;
  std::vector<torch::Tensor> expert_ids;
  expert_ids.reserve(layers);
  for (size_t l = 0; l < layers; ++l) {
    const torch::Tensor* w = &weights[l * kWeightsPerLayer];
    const torch::Tensor &input_norm = w[0], *qkv_w = w + 1, *o_w = w + 4, &post_norm = w[7], &router = w[8],
                        *w13 = w + 9, *w2 = w + 12;
    const int64_t* format = &formats[4 * l];  // of qkv, o, w13, w2
    // attention: x = norm(h + residual), the stream kept for the next add
    std::vector<torch::Tensor> normed = rms_norm(h, residual, input_norm, eps);
    residual = residual ? normed[1] : h;
    const torch::Tensor qkv = matmul(normed[0], qkv_w, format[0], (heads + 2 * kv_heads) * head_dim)
                                  .view({tokens, heads + 2 * kv_heads, head_dim});
    const torch::Tensor qk = rotary(qkv.narrow(1, 0, heads + kv_heads), cos, signed_sin);
    const torch::Tensor attended = paged_attention(qk.narrow(1, 0, heads), qk.narrow(1, heads, kv_heads),
                                                   qkv.narrow(1, heads + kv_heads, kv_heads), kv_caches[l],
                                                   block_tables, context, scale, windows[l], std::nullopt);
    const torch::Tensor attention_out = matmul(attended.reshape({tokens, -1}), o_w, format[1], hidden);
    // the MoE block on norm(attention out + residual)
    normed = rms_norm(attention_out, residual, post_norm, eps);
    residual = normed[1];
    const torch::Tensor logits = tiled_linear(normed[0], router, w13[0].size(0));
    torch::Tensor routing, ids;
    if (renormalize) {  // the softmax of the k best logits
      auto [best, chosen] = at::topk(logits, top_k, -1);
      routing = at::softmax(best, -1, at::kFloat);
      ids = chosen;
    } else {
      std::tie(routing, ids) = at::topk(at::softmax(logits, -1, at::kFloat), top_k, -1);
    }
    h = format[2] == kBFloat16
            ? fused_moe(normed[0], ids, routing, w13[0], w2[0], false)
            : fused_moe_quant(normed[0], ids, routing, w13[0], w13[1], w13[2], w2[0], w2[1], w2[2],
                              std::abs(format[2]), std::abs(format[3]), format[2] < 0, false);
    expert_ids.push_back(ids);
  }
  return {rms_norm(h, residual, final_norm, eps)[0], at::stack(expert_ids)};
}
