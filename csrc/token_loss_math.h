// Per-token arithmetic of the policy loss (the CUDA twin of kernels/policy_loss.py and of
// erpo.losses.token_loss.token_terms_torch), `__host__ __device__` so the host tests run it with g++.
//
// Per token (float32): ratio = exp(logp - old),
//   pg   = -min(ratio a, clip(ratio, 1 - eps_low, 1 + eps_high) a)       (no_clip: pg = -ratio a)
//   pg   = min(pg, -c a) where a < 0                                       (dual_clip)
//   loss = pg + kl_coef k(logp, ref) - entropy_coef H + klcov_w |logp - old|
// with dloss/dlogp, dloss/dH and the clip indicators (low: a < 0 and ratio < 1 - eps_low; high: a > 0 and
// ratio > 1 + eps_high). The clamp and the max are written with comparisons, not fminf/fmaxf, so a NaN
// ratio stays NaN in the loss (as in the torch twin) instead of being replaced by a clip bound.
#pragma once

#include <math.h>

#include "softmax_row_math.h"  // ERPO_HD

namespace erpo {

enum KlEstimator { kKlK1 = 1, kKlK2 = 2, kKlK3 = 3 };  // the codes of kernels/policy_loss.py

struct TokenParams {
  float eps_low;
  float eps_high;
  float dual_clip_c;
  float kl_coef;
  float entropy_coef;
  int no_clip;       // KL-Cov: the plain ratio surrogate
  int dual_clip;
  int kl_estimator;  // KlEstimator; used only with a reference log-prob
};

struct TokenTerms {
  float loss;
  float dlogp;     // dloss/dlogp
  float dentropy;  // dloss/dH
  bool clip_low;
  bool clip_high;
};

// has_ref / has_klcov say whether ref and klcov_w are given (their values are ignored otherwise).
ERPO_HD TokenTerms token_terms(float logp, float entropy, float old, float adv, bool has_ref, float ref,
                               bool has_klcov, float klcov_w, const TokenParams& p) {
  const float log_ratio = logp - old;
  const float ratio = expf(log_ratio);
  const float unclipped = -adv * ratio;
  TokenTerms t{0.0f, 0.0f, -p.entropy_coef, false, false};
  float pg;
  if (p.no_clip) {
    pg = unclipped;
    t.dlogp = unclipped;
  } else {
    const float low = 1.0f - p.eps_low;
    const float high = 1.0f + p.eps_high;
    const float clamped = ratio < low ? low : (ratio > high ? high : ratio);
    const float clipped = -adv * clamped;
    const bool unclipped_wins = unclipped >= clipped;
    pg = unclipped_wins ? unclipped : clipped;
    t.dlogp = unclipped_wins ? unclipped : 0.0f;
    t.clip_low = adv < 0.0f && ratio < low;
    t.clip_high = adv > 0.0f && ratio > high;
    if (p.dual_clip) {
      const float bound = -p.dual_clip_c * adv;
      if (adv < 0.0f && pg > bound) {
        pg = bound;
        t.dlogp = 0.0f;
      }
    }
  }
  t.loss = pg - p.entropy_coef * entropy;
  if (has_ref) {
    const float diff = logp - ref;
    if (p.kl_estimator == kKlK1) {
      t.loss += p.kl_coef * diff;
      t.dlogp += p.kl_coef;
    } else if (p.kl_estimator == kKlK2) {
      t.loss += p.kl_coef * 0.5f * diff * diff;
      t.dlogp += p.kl_coef * diff;
    } else {
      const float back = expf(-diff);  // exp(ref - logp)
      t.loss += p.kl_coef * (back + diff - 1.0f);
      t.dlogp += p.kl_coef * (1.0f - back);
    }
  }
  if (has_klcov) {
    t.loss += klcov_w * fabsf(log_ratio);
    t.dlogp += klcov_w * (log_ratio > 0.0f ? 1.0f : (log_ratio < 0.0f ? -1.0f : 0.0f));
  }
  return t;
}

}  // namespace erpo
