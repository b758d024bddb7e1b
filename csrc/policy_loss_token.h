// Plain C launcher of the per-token policy-loss kernel (policy_loss_token.cu); see token_loss_math.h for the
// formulas. All per-token arrays hold n contiguous float32 values (the clip flags n bytes, 0 or 1); ref,
// klcov_w and the TokenExtras arrays (log_ratio ... pg_weight; eps_*_t are the per-token clip ranges) may be
// NULL (absent). objective: an erpo::Objective of token_loss_math.h (kVespo and kGmpo need seq_coef);
// kl_estimator: 1 k1, 2 k2, 3 k3; clip_lo / clip_hi: 1 - eps_low and 1 + eps_high.
#pragma once

#include <stdint.h>

#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

cudaError_t erpo_policy_loss_token(const float* logp, const float* entropy, const float* old, const float* adv,
                                   const float* ref, const float* klcov_w, const float* log_ratio,
                                   const float* seq_coef, const float* eps_low_t, const float* eps_high_t,
                                   const float* kl_weight, const float* pg_weight, float* loss, float* dlogp,
                                   float* dentropy, int8_t* clip_low, int8_t* clip_high, int64_t n, float eps_low,
                                   float eps_high, float clip_lo, float clip_hi, float dual_clip_c, float kl_coef,
                                   float entropy_coef, float delta, float cispo_max, float sapo_tau_pos,
                                   float sapo_tau_neg, int objective, int dual_clip, int has_delta, int cispo_upper,
                                   int kl_estimator, int kl_bias, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
