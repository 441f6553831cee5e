// Every decoder layer of a step in one call, for the common shapes of MoE models (Mixtral's, Qwen's, OLMoE's):
// pre-norm attention (a merged q/k/v projection, its bias, QK-norm and clipping where the family has them, rotary
// on query and key heads, attention over the paged cache, the output projection) then a pre-norm sparse MoE block
// (a softmax top-k router, SwiGLU experts in tiles, a shared expert with its sigmoid gate where there is one), each
// matmul on bf16 tiles or on 8- or 4-bit or float8 ones.
//
// It calls the same kernels and ops in the same order as the layers' Python code does, so its numbers are those of
// the Python path, bit for bit. What it removes is the path between the kernels: at one decode token the kernels of
// the 140M benchmark model read its weights in ~2.5 ms, and the Python around them (modules, views, the router's
// two small ops, the argument conversions of ~60 calls) added ~1 ms more; one call of this has none of that.
#include <torch/extension.h>

#include <cstdlib>
#include <vector>

#include "cpu_kernels.h"
#include "tensor_args.h"

namespace {

// A layer's tensors, a matmul's weight taking three places (bf16 tiles and two unused, or the quantized tiles' q,
// scales and zeros); an optional part absent is an empty tensor.
enum Slot : size_t {
  kInputNorm = 0, kQkv = 1, kQkvBias = 4, kO = 5, kOBias = 8, kQNorm = 9, kKNorm = 10, kPostNorm = 11,
  kRouter = 12, kW13 = 13, kW2 = 16, kSharedGateUp = 19, kSharedDown = 22, kSharedGate = 25, kWeightsPerLayer = 26
};
// A layer's matmul formats, in this order: bf16 tiles (kBFloat16), else the bits (8, 4), negative for float8.
enum Format : size_t { kQkvFormat, kOFormat, kW13Format, kW2Format, kSharedGateUpFormat, kSharedDownFormat,
                       kFormatsPerLayer };
constexpr int64_t kBFloat16 = 16;

torch::Tensor matmul(const torch::Tensor& x, const torch::Tensor* w, int64_t format, int64_t n) {
  if (format == kBFloat16) return tiled_linear(x, w[0], n);
  return tiled_linear_quant(x, w[0], w[1], w[2], std::abs(format), format < 0, n);
}

// A Linear's forward: the matmul, then its bias where it has one.
torch::Tensor linear(const torch::Tensor& x, const torch::Tensor* w, int64_t format, int64_t n,
                     const torch::Tensor& bias) {
  torch::Tensor out = matmul(x, w, format, n);
  return bias.numel() ? out + bias : out;
}

// RMSNorm over runs of weight.size(0) features of each row (a head, or the whole projection), as QK-norm does.
torch::Tensor norm_runs(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  const int64_t rows = x.size(0);
  return rms_norm(x.reshape({rows, -1, weight.size(0)}), std::nullopt, weight, eps)[0].reshape({rows, -1});
}

}  // namespace

// h [T, D] bf16 embeddings; positions [T]; cos_table and signed_sin_table [P, head dim] float32 (the rotary
// tables, layers/rotary.py); kv_caches one per layer; block_tables [T, W] and context [T] as paged_attention takes
// them (a row per token); weights: kWeightsPerLayer per layer; formats: kFormatsPerLayer per layer (w13 and w2 both
// float8 or neither); windows: each layer's sliding window (0: none); clip: q, k and v clamped to +-clip (< 0: not);
// shared_size: the shared expert's intermediate size (0: none).
// Returns [the final norm of the last hidden states [T, D], each layer's expert ids [L, T, K]].
std::vector<torch::Tensor> decoder_layers(torch::Tensor h, torch::Tensor positions, torch::Tensor cos_table,
                                          torch::Tensor signed_sin_table, std::vector<torch::Tensor> kv_caches,
                                          torch::Tensor block_tables, torch::Tensor context,
                                          std::vector<torch::Tensor> weights, std::vector<int64_t> formats,
                                          std::vector<int64_t> windows, int64_t heads, int64_t kv_heads,
                                          double scale, double eps, double clip, int64_t top_k, bool renormalize,
                                          int64_t shared_size, torch::Tensor final_norm) {
  const size_t layers = kv_caches.size();
  TORCH_CHECK(layers > 0 && weights.size() == layers * kWeightsPerLayer &&
                  formats.size() == layers * kFormatsPerLayer && windows.size() == layers,
              "decoder_layers takes ", static_cast<size_t>(kWeightsPerLayer), " weights, ",
              static_cast<size_t>(kFormatsPerLayer), " formats and a window per layer");
  TORCH_CHECK(h.dim() == 2 && h.scalar_type() == at::kBFloat16, "decoder_layers takes bf16 hidden states [T, D]");
  check_on_cpu("decoder_layers", {&h, &positions, &cos_table, &signed_sin_table});
  const int64_t tokens = h.size(0), hidden = h.size(1), head_dim = cos_table.size(1);
  const int64_t q_size = heads * head_dim, kv_size = kv_heads * head_dim;
  const torch::Tensor cos = cos_table.index_select(0, positions).to(at::kBFloat16);
  const torch::Tensor signed_sin = signed_sin_table.index_select(0, positions).to(at::kBFloat16);
  std::optional<torch::Tensor> residual;
  std::vector<torch::Tensor> expert_ids;
  expert_ids.reserve(layers);
  for (size_t l = 0; l < layers; ++l) {
    const torch::Tensor* w = &weights[l * kWeightsPerLayer];
    const int64_t* format = &formats[l * kFormatsPerLayer];
    // attention: x = norm(h + residual), the stream kept for the next add
    std::vector<torch::Tensor> normed = rms_norm(h, residual, w[kInputNorm], eps);
    residual = residual ? normed[1] : h;
    torch::Tensor qkv = linear(normed[0], w + kQkv, format[kQkvFormat], q_size + 2 * kv_size, w[kQkvBias]);
    if (w[kQNorm].numel()) {
      const std::vector<torch::Tensor> parts = qkv.split_with_sizes({q_size, kv_size, kv_size}, -1);
      qkv = at::cat({norm_runs(parts[0], w[kQNorm], eps), norm_runs(parts[1], w[kKNorm], eps), parts[2]}, -1);
    }
    if (clip >= 0) qkv = qkv.clamp(-clip, clip);
    qkv = qkv.view({tokens, heads + 2 * kv_heads, head_dim});
    const torch::Tensor qk = rotary(qkv.narrow(1, 0, heads + kv_heads), cos, signed_sin);
    const torch::Tensor attended = paged_attention(qk.narrow(1, 0, heads), qk.narrow(1, heads, kv_heads),
                                                   qkv.narrow(1, heads + kv_heads, kv_heads), kv_caches[l],
                                                   block_tables, context, scale, windows[l], std::nullopt);
    const torch::Tensor attention_out = linear(attended.reshape({tokens, -1}), w + kO, format[kOFormat], hidden,
                                               w[kOBias]);
    // the MoE block on x = norm(attention out + residual)
    normed = rms_norm(attention_out, residual, w[kPostNorm], eps);
    residual = normed[1];
    const torch::Tensor& x = normed[0];
    const torch::Tensor* w13 = w + kW13;
    const torch::Tensor* w2 = w + kW2;
    const torch::Tensor logits = tiled_linear(x, w[kRouter], w13[0].size(0));
    torch::Tensor routing, ids;
    if (renormalize) {  // the softmax of the k best logits
      auto [best, chosen] = at::topk(logits, top_k, -1);
      routing = at::softmax(best, -1, at::kFloat);
      ids = chosen;
    } else {
      std::tie(routing, ids) = at::topk(at::softmax(logits, -1, at::kFloat), top_k, -1);
    }
    h = format[kW13Format] == kBFloat16
            ? fused_moe(x, ids, routing, w13[0], w2[0], false)
            : fused_moe_quant(x, ids, routing, w13[0], w13[1], w13[2], w2[0], w2[1], w2[2],
                              std::abs(format[kW13Format]), std::abs(format[kW2Format]), format[kW13Format] < 0,
                              false);
    expert_ids.push_back(ids);
    if (shared_size) {  // the shared expert, SwiGLU, sees every token; its sigmoid gate where there is one
      const std::vector<torch::Tensor> gate_up =
          matmul(x, w + kSharedGateUp, format[kSharedGateUpFormat], 2 * shared_size).chunk(2, -1);
      torch::Tensor shared = matmul(at::silu(gate_up[0]) * gate_up[1], w + kSharedDown, format[kSharedDownFormat],
                                    hidden);
      if (w[kSharedGate].numel()) shared = at::sigmoid(tiled_linear(x, w[kSharedGate], 1)) * shared;
      h = h + shared;
    }
  }
  return {rms_norm(h, residual, final_norm, eps)[0], at::stack(expert_ids)};
}
