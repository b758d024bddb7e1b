// Plain C launcher of the per-token policy-loss kernel (policy_loss_token.cu); see token_loss_math.h for the
// formulas. All per-token arrays hold n contiguous float32 values (the clip flags n bytes, 0 or 1); ref and
// klcov_w may be NULL (absent). kl_estimator: 1 k1, 2 k2, 3 k3.
#pragma once

#include <stdint.h>

#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

cudaError_t erpo_policy_loss_token(const float* logp, const float* entropy, const float* old, const float* adv,
                                   const float* ref, const float* klcov_w, float* loss, float* dlogp,
                                   float* dentropy, int8_t* clip_low, int8_t* clip_high, int64_t n, float eps_low,
                                   float eps_high, float dual_clip_c, float kl_coef, float entropy_coef, int no_clip,
                                   int dual_clip, int kl_estimator, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
