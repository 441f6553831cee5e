// The greedy token of each row of logits, for CPUs.
//
// PyTorch's argmax over the last dimension compares one element at a time; 16 rows of a 32000-token vocabulary
// took it ~0.25 ms a decode step. Here each row is scanned 16 lanes at a time, keeping each lane's best value
// and where it was, and rows are split over the threads.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cfloat>

#include "tensor_args.h"

namespace {

// The first index of the largest value of row[0, n).
int64_t argmax_row(const float* row, int64_t n) {
  __m512 best = _mm512_set1_ps(-FLT_MAX);
  __m512i where = _mm512_setzero_si512();
  __m512i index = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i step = _mm512_set1_epi32(16);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 valid = n - i >= 16 ? 0xffff : static_cast<__mmask16>((1u << (n - i)) - 1);
    const __m512 v = _mm512_mask_loadu_ps(_mm512_set1_ps(-FLT_MAX), valid, row + i);
    const __mmask16 better = _mm512_cmp_ps_mask(v, best, _CMP_GT_OQ);  // strictly: a lane keeps its first best
    best = _mm512_mask_mov_ps(best, better, v);
    where = _mm512_mask_mov_epi32(where, better, index);
    index = _mm512_add_epi32(index, step);
  }
  const float top = _mm512_reduce_max_ps(best);
  const __mmask16 at_top = _mm512_cmp_ps_mask(best, _mm512_set1_ps(top), _CMP_EQ_OQ);
  // of the lanes holding the largest value, the smallest index (the first in the row)
  return _mm512_mask_reduce_min_epi32(at_top, where);
}

}  // namespace

// logits [S, V] float32 -> the index of each row's largest value [S] int64, the first where several tie.
torch::Tensor argmax_rows(torch::Tensor logits) {
  check_on_cpu("argmax_rows", {&logits});
  TORCH_CHECK(logits.scalar_type() == at::kFloat && logits.dim() == 2, "argmax_rows takes float32 [S, V]");
  TORCH_CHECK(logits.size(1) > 0 && logits.size(1) < (int64_t(1) << 31), "argmax_rows needs 0 < V < 2^31");
  logits = logits.contiguous();
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  auto out = torch::empty({rows}, logits.options().dtype(at::kLong));
  const float* in = logits.data_ptr<float>();
  int64_t* tokens = out.data_ptr<int64_t>();
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) tokens[r] = argmax_row(in + r * vocab, vocab);
  });
  return out;
}
