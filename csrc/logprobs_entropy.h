// Plain C launchers of the fused op's CUDA kernels (logprobs_entropy.cu). No torch types: the torch binding
// (binding.cpp) passes raw pointers, element strides and sizes, and its current stream.
//
// Rows: row r of the logits starts at element (r / inner) * stride_outer + (r % inner) * stride_inner of
// `logits` and holds `vocab` contiguous elements. `targets` holds n_rows ids, int64 if targets_int64 else
// int32. Outputs are n_rows contiguous float32. block_threads = 0 picks the default per vocabulary size;
// otherwise a multiple of 32 in [32, 512] (for tuning).
//
// Return cudaSuccess, cudaErrorInvalidValue for bad arguments, or the launch error.
#pragma once

#include <stdint.h>

#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

enum erpo_dtype { ERPO_FLOAT32 = 0, ERPO_FLOAT16 = 1, ERPO_BFLOAT16 = 2 };

// logp = x[target] - lse, entropy, lse of softmax(x) with x = logits * inv_temperature, per row.
// Rows whose target equals ignore_index are not read: logp = entropy = lse = 0.
cudaError_t erpo_logprobs_entropy_fwd(
    const void* logits, int dtype, int64_t stride_outer, int64_t stride_inner, int64_t inner,
    const void* targets, int targets_int64, float* logp, float* entropy, float* lse,
    int64_t n_rows, int64_t vocab, float inv_temperature, int64_t ignore_index,
    int block_threads, cudaStream_t stream);

// grad = dlogits of sum(grad_logp * logp + grad_entropy * entropy), written in the logits' dtype at its own
// row strides; grad may equal logits (in-place gradient). grad_logp / grad_entropy may be NULL (absent).
// Rows whose target equals ignore_index get zeros without being read.
cudaError_t erpo_logprobs_entropy_bwd(
    const void* logits, int dtype, int64_t stride_outer, int64_t stride_inner, int64_t inner,
    void* grad, int64_t grad_stride_outer, int64_t grad_stride_inner,
    const void* targets, int targets_int64, const float* lse, const float* entropy,
    const float* grad_logp, const float* grad_entropy,
    int64_t n_rows, int64_t vocab, float inv_temperature, int64_t ignore_index,
    int block_threads, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
