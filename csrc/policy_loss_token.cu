// CUDA kernel of the per-token part of the policy loss: O(N) elementwise work over per-token floats (no
// vocabulary), so the plan is simply coalesced float32 loads and stores, one token per thread, a grid-stride
// loop with int64 indices. The arithmetic is token_loss_math.h, shared with the host tests.
#include <cuda_runtime.h>

#include "policy_loss_token.h"
#include "token_loss_math.h"

namespace erpo {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535;  // plenty to fill any GPU; the loop covers the rest

__global__ void __launch_bounds__(kThreads)
policy_loss_token_kernel(const float* __restrict__ logp, const float* __restrict__ entropy,
                         const float* __restrict__ old, const float* __restrict__ adv, const float* __restrict__ ref,
                         const float* __restrict__ klcov_w, float* __restrict__ loss, float* __restrict__ dlogp,
                         float* __restrict__ dentropy, int8_t* __restrict__ clip_low, int8_t* __restrict__ clip_high,
                         int64_t n, TokenParams params) {
  const bool has_ref = ref != nullptr;
  const bool has_klcov = klcov_w != nullptr;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const TokenTerms t = token_terms(logp[i], entropy[i], old[i], adv[i], has_ref, has_ref ? ref[i] : 0.0f, has_klcov,
                                     has_klcov ? klcov_w[i] : 0.0f, params);
    loss[i] = t.loss;
    dlogp[i] = t.dlogp;
    dentropy[i] = t.dentropy;
    clip_low[i] = t.clip_low ? 1 : 0;
    clip_high[i] = t.clip_high ? 1 : 0;
  }
}

}  // namespace
}  // namespace erpo

extern "C" cudaError_t erpo_policy_loss_token(const float* logp, const float* entropy, const float* old,
                                              const float* adv, const float* ref, const float* klcov_w, float* loss,
                                              float* dlogp, float* dentropy, int8_t* clip_low, int8_t* clip_high,
                                              int64_t n, float eps_low, float eps_high, float dual_clip_c,
                                              float kl_coef, float entropy_coef, int no_clip, int dual_clip,
                                              int kl_estimator, cudaStream_t stream) {
  using namespace erpo;
  if (n < 0 || kl_estimator < kKlK1 || kl_estimator > kKlK3) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  if (!logp || !entropy || !old || !adv || !loss || !dlogp || !dentropy || !clip_low || !clip_high)
    return cudaErrorInvalidValue;
  const TokenParams params{eps_low, eps_high, dual_clip_c, kl_coef, entropy_coef, no_clip, dual_clip, kl_estimator};
  const int64_t blocks_needed = (n + kThreads - 1) / kThreads;
  const unsigned blocks = static_cast<unsigned>(blocks_needed < kMaxBlocks ? blocks_needed : kMaxBlocks);
  policy_loss_token_kernel<<<blocks, kThreads, 0, stream>>>(logp, entropy, old, adv, ref, klcov_w, loss, dlogp,
                                                            dentropy, clip_low, clip_high, n, params);
  return cudaGetLastError();
}
