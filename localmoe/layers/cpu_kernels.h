// The CPU kernels' entry points, as the bindings (cpu_kernels.cpp) and the fused decoder (decoder_cpu.cpp) call them.
#pragma once
#include <torch/extension.h>

#include <optional>
#include <vector>

torch::Tensor argmax_rows(torch::Tensor logits);
torch::Tensor fused_moe(torch::Tensor x, torch::Tensor expert_ids, torch::Tensor weights, torch::Tensor w13,
                        torch::Tensor w2, bool float_out);
torch::Tensor fused_moe_quant(torch::Tensor x, torch::Tensor expert_ids, torch::Tensor weights, torch::Tensor w13,
                              torch::Tensor s13, torch::Tensor z13, torch::Tensor w2, torch::Tensor s2,
                              torch::Tensor z2, int64_t bits13, int64_t bits2, bool float8,
                              bool float_out);
torch::Tensor paged_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor kv_cache,
                               torch::Tensor block_tables, torch::Tensor context_lens, double scale,
                               int64_t window, std::optional<torch::Tensor> sinks);
std::vector<torch::Tensor> rms_norm(torch::Tensor x, std::optional<torch::Tensor> residual, torch::Tensor weight,
                                    double eps);
torch::Tensor rotary(torch::Tensor x, torch::Tensor cos, torch::Tensor signed_sin);
torch::Tensor tiled_linear(torch::Tensor x, torch::Tensor w, int64_t n);
torch::Tensor tiled_linear_quant(torch::Tensor x, torch::Tensor w, torch::Tensor scales, torch::Tensor zeros,
                                 int64_t bits, bool float8, int64_t n);
torch::Tensor to_tiles(torch::Tensor weight);
torch::Tensor quant_tiles(torch::Tensor values, int64_t bits);
std::vector<torch::Tensor> decoder_layers(torch::Tensor h, torch::Tensor positions, torch::Tensor cos_table,
                                          torch::Tensor signed_sin_table, std::vector<torch::Tensor> kv_caches,
                                          torch::Tensor block_tables, torch::Tensor context,
                                          std::vector<torch::Tensor> weights, std::vector<int64_t> formats,
                                          std::vector<int64_t> windows, int64_t heads, int64_t kv_heads,
                                          double scale, double eps, double clip, int64_t top_k, bool renormalize,
                                          int64_t shared_size, torch::Tensor final_norm);
