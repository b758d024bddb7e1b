// CUDA kernel of the per-token part of the policy loss: O(N) elementwise work over per-token floats (no
// vocabulary), so the plan is simply coalesced float32 loads and stores, one token per thread, a grid-stride
// loop with int64 indices; the objective and which optional arrays exist are runtime values, uniform over
// the grid (no divergence). The arithmetic is token_loss_math.h, shared with the host tests.
#include <cuda_runtime.h>

#include "policy_loss_token.h"
#include "token_loss_math.h"

namespace erpo {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535;  // plenty to fill any GPU; the loop covers the rest

__global__ void __launch_bounds__(kThreads)
policy_loss_token_kernel(TokenArrays arrays, float* __restrict__ loss, float* __restrict__ dlogp,
                         float* __restrict__ dentropy, int8_t* __restrict__ clip_low, int8_t* __restrict__ clip_high,
                         int64_t n, TokenParams params) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const TokenTerms t = token_terms_at(arrays, i, params);
    loss[i] = t.loss;
    dlogp[i] = t.dlogp;
    dentropy[i] = t.dentropy;
    clip_low[i] = t.clip_low ? 1 : 0;
    clip_high[i] = t.clip_high ? 1 : 0;
  }
}

}  // namespace
}  // namespace erpo

extern "C" cudaError_t erpo_policy_loss_token(
    const float* logp, const float* entropy, const float* old, const float* adv, const float* ref,
    const float* klcov_w, const float* log_ratio, const float* seq_coef, const float* eps_low_t,
    const float* eps_high_t, const float* kl_weight, const float* pg_weight, float* loss, float* dlogp,
    float* dentropy, int8_t* clip_low, int8_t* clip_high, int64_t n, float eps_low, float eps_high, float clip_lo,
    float clip_hi, float dual_clip_c, float kl_coef, float entropy_coef, float delta, float cispo_max,
    float sapo_tau_pos, float sapo_tau_neg, int objective, int dual_clip, int has_delta, int cispo_upper,
    int kl_estimator, int kl_bias, cudaStream_t stream) {
  using namespace erpo;
  if (n < 0 || kl_estimator < kKlK1 || kl_estimator > kKlK3 || objective < kClip || objective > kGmpo)
    return cudaErrorInvalidValue;
  if ((objective == kVespo || objective == kGmpo) && !seq_coef) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  if (!logp || !entropy || !old || !adv || !loss || !dlogp || !dentropy || !clip_low || !clip_high)
    return cudaErrorInvalidValue;
  const TokenArrays arrays{logp, entropy, old, adv, ref, klcov_w, log_ratio, seq_coef, eps_low_t, eps_high_t,
                           kl_weight, pg_weight};
  const TokenParams params{eps_low,   eps_high,     clip_lo,      clip_hi,   dual_clip_c, kl_coef,
                           entropy_coef, delta,     cispo_max,    sapo_tau_pos, sapo_tau_neg, objective,
                           dual_clip, has_delta,    cispo_upper,  kl_estimator, kl_bias};
  const int64_t blocks_needed = (n + kThreads - 1) / kThreads;
  const unsigned blocks = static_cast<unsigned>(blocks_needed < kMaxBlocks ? blocks_needed : kMaxBlocks);
  policy_loss_token_kernel<<<blocks, kThreads, 0, stream>>>(arrays, loss, dlogp, dentropy, clip_low, clip_high, n,
                                                            params);
  return cudaGetLastError();
}
