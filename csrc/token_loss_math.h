// Per-token arithmetic of the policy loss (the CUDA twin of kernels/policy_loss.py and of
// erpo.losses.token_loss.token_terms_torch, whose `_surrogate` is the reference of each objective),
// `__host__ __device__` so the host tests run it with g++.
//
// Per token (float32): lr = log_ratio if given (sequence-level IS, GSPO-token form) else logp - old,
// ratio = exp(lr), pg = the objective's surrogate (clip with optional delta cap and dual clip, plain, cispo,
// sapo, vespo, gpg, gmpo) with eps_low/eps_high scalars or per-token values (Archer), pg *= pg_weight,
//   loss = pg - entropy_coef H + kl_coef kl_weight (ratio) k(logp, ref) + klcov_w |logp - old|
// with dloss/dlogp, dloss/dH and the clip indicators. min, max and clamp propagate NaN from any operand
// (as torch.minimum/maximum/clamp), written with comparisons, never fminf/fmaxf (which drop a NaN operand),
// so a NaN ratio stays NaN in the loss instead of being replaced by a clip bound.
#pragma once

#include <math.h>

#include "softmax_row_math.h"  // ERPO_HD

namespace erpo {

enum KlEstimator { kKlK1 = 1, kKlK2 = 2, kKlK3 = 3 };  // the codes of kernels/policy_loss.py
// erpo.losses.objectives.Objective, the definition (tests/csrc/test_host_token_loss.py holds the two equal).
enum Objective { kClip = 0, kPlain = 1, kCispo = 2, kSapo = 3, kVespo = 4, kGpg = 5, kGmpo = 6 };

struct TokenParams {
  float eps_low;
  float eps_high;
  float clip_lo;  // 1 - eps_low and 1 + eps_high, rounded once from float64 by the host (as torch does)
  float clip_hi;
  float dual_clip_c;
  float kl_coef;
  float entropy_coef;
  float delta;  // cap of the unclipped ratio, used when has_delta
  float cispo_max;
  float sapo_tau_pos;
  float sapo_tau_neg;
  int objective;  // Objective
  int dual_clip;
  int has_delta;
  int cispo_upper;   // cispo's weight min(r, cispo_max) (else clip(r, 1 - eps_low, 1 + eps_high))
  int kl_estimator;  // KlEstimator; used only with a reference log-prob
  int kl_bias;       // KL term times the ratio, gradient through the ratio
};

// One token's optional inputs: has_* false = absent (the value is then ignored).
struct TokenOptional {
  bool has_ref = false, has_klcov = false, has_log_ratio = false, has_seq_coef = false;
  bool has_eps_low = false, has_eps_high = false, has_kl_weight = false, has_pg_weight = false;
  float ref = 0.0f, klcov_w = 0.0f, log_ratio = 0.0f, seq_coef = 0.0f;
  float eps_low = 0.0f, eps_high = 0.0f, kl_weight = 0.0f, pg_weight = 0.0f;
};

struct TokenTerms {
  float loss;
  float dlogp;     // dloss/dlogp
  float dentropy;  // dloss/dH
  bool clip_low;
  bool clip_high;
};

// NaN from either operand wins, as torch.maximum / torch.minimum.
ERPO_HD float max_nan(float a, float b) { return (a > b || a != a) ? a : b; }
ERPO_HD float min_nan(float a, float b) { return (a < b || a != a) ? a : b; }
ERPO_HD float clamp_nan(float x, float lo, float hi) { return min_nan(max_nan(x, lo), hi); }
ERPO_HD float sign_of(float x) { return x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : 0.0f); }  // torch.sign: 0 on NaN

ERPO_HD TokenTerms token_terms(float logp, float entropy, float old, float adv, const TokenOptional& x,
                                      const TokenParams& p) {
  const float token_log_ratio = logp - old;
  const float log_ratio = x.has_log_ratio ? x.log_ratio : token_log_ratio;
  const float ratio = expf(log_ratio);
  const float e_low = x.has_eps_low ? x.eps_low : p.eps_low;
  const float e_high = x.has_eps_high ? x.eps_high : p.eps_high;
  const float lo = x.has_eps_low ? 1.0f - x.eps_low : p.clip_lo;
  const float hi = x.has_eps_high ? 1.0f + x.eps_high : p.clip_hi;
  const float seq_coef = x.has_seq_coef ? x.seq_coef : 0.0f;
  TokenTerms t{0.0f, 0.0f, -p.entropy_coef, false, false};
  float pg = 0.0f;
  switch (p.objective) {
    case kClip: {
      const float unclipped = -adv * (p.has_delta ? min_nan(ratio, p.delta) : ratio);
      const float d_unclipped = p.has_delta ? (ratio < p.delta ? unclipped : 0.0f) : unclipped;
      const float clipped = -adv * clamp_nan(ratio, lo, hi);
      pg = max_nan(unclipped, clipped);
      t.dlogp = unclipped >= clipped ? d_unclipped : 0.0f;
      t.clip_low = adv < 0.0f && ratio < lo;
      t.clip_high = adv > 0.0f && ratio > hi;
      if (p.dual_clip) {
        const float bound = -p.dual_clip_c * adv;
        if (adv < 0.0f && pg > bound) {
          pg = bound;
          t.dlogp = 0.0f;
        }
      }
      break;
    }
    case kPlain:  // KL-Cov's: the ratio surrogate without the clip
      pg = -adv * ratio;
      t.dlogp = pg;
      break;
    case kCispo: {  // the detached, clipped ratio weighs the log-prob
      const float low = p.cispo_upper ? 0.0f : lo;
      const float high = p.cispo_upper ? p.cispo_max : hi;
      const float weight = p.cispo_upper ? min_nan(ratio, high) : clamp_nan(ratio, low, high);
      t.dlogp = -weight * adv;
      pg = t.dlogp * logp;
      t.clip_low = adv < 0.0f && ratio < low;  // the side that binds for a's sign, as the clip objective's flags
      t.clip_high = adv > 0.0f && ratio > high;
      break;
    }
    case kSapo: {  // the soft gate sigmoid(tau (r - 1)) 4 / tau; d/dlogp = 4 sigmoid (1 - sigmoid) r
      const float tau = adv > 0.0f ? p.sapo_tau_pos : p.sapo_tau_neg;
      const float gate = 1.0f / (1.0f + expf(-(tau * (ratio - 1.0f))));
      pg = -adv * gate * 4.0f / tau;
      t.dlogp = -adv * 4.0f * gate * (1.0f - gate) * ratio;
      break;
    }
    case kVespo:  // the response's detached weight phi on the log-prob
      t.dlogp = -seq_coef * adv;
      pg = t.dlogp * logp;
      break;
    case kGpg:
      t.dlogp = -adv;
      pg = t.dlogp * logp;
      break;
    default: {  // kGmpo: gradient where sign(a) min(sign(a) lr, sign(a) clip(lr)) picks the unclipped log-ratio
      const float clamped = clamp_nan(log_ratio, -e_low, e_high);
      const float sign = sign_of(adv);
      const bool open = sign * log_ratio <= sign * clamped;
      const bool was_clipped = log_ratio != clamped;  // true on NaN, as torch's !=
      pg = -adv * seq_coef;
      t.dlogp = open ? pg : 0.0f;
      t.clip_low = was_clipped && adv < 0.0f;
      t.clip_high = was_clipped && adv > 0.0f;
      break;
    }
  }
  if (x.has_pg_weight) {
    pg = pg * x.pg_weight;
    t.dlogp = t.dlogp * x.pg_weight;
  }
  t.loss = pg - p.entropy_coef * entropy;
  if (x.has_ref) {
    const float diff = logp - x.ref;
    float kl, dkl;
    if (p.kl_estimator == kKlK1) {
      kl = diff;
      dkl = 1.0f;
    } else if (p.kl_estimator == kKlK2) {
      kl = 0.5f * diff * diff;
      dkl = diff;
    } else {
      const float back = expf(-diff);  // exp(ref - logp)
      kl = back + diff - 1.0f;
      dkl = 1.0f - back;
    }
    const float coef = x.has_kl_weight ? p.kl_coef * x.kl_weight : p.kl_coef;
    if (p.kl_bias) {  // d/dlogp [r kl] = r kl + r dkl (the ratio is not detached)
      dkl = ratio * (kl + dkl);
      kl = ratio * kl;
    }
    t.loss = t.loss + coef * kl;
    t.dlogp = t.dlogp + coef * dkl;
  }
  if (x.has_klcov) {
    t.loss = t.loss + x.klcov_w * fabsf(token_log_ratio);
    t.dlogp = t.dlogp + x.klcov_w * sign_of(token_log_ratio);
  }
  return t;
}

// Token i of the arrays (any optional array may be null: absent).
struct TokenArrays {
  const float* logp;
  const float* entropy;
  const float* old;
  const float* adv;
  const float* ref;
  const float* klcov_w;
  const float* log_ratio;
  const float* seq_coef;
  const float* eps_low;
  const float* eps_high;
  const float* kl_weight;
  const float* pg_weight;
};

ERPO_HD TokenTerms token_terms_at(const TokenArrays& a, int64_t i, const TokenParams& p) {
  TokenOptional x;
  if (a.ref) { x.has_ref = true; x.ref = a.ref[i]; }
  if (a.klcov_w) { x.has_klcov = true; x.klcov_w = a.klcov_w[i]; }
  if (a.log_ratio) { x.has_log_ratio = true; x.log_ratio = a.log_ratio[i]; }
  if (a.seq_coef) { x.has_seq_coef = true; x.seq_coef = a.seq_coef[i]; }
  if (a.eps_low) { x.has_eps_low = true; x.eps_low = a.eps_low[i]; }
  if (a.eps_high) { x.has_eps_high = true; x.eps_high = a.eps_high[i]; }
  if (a.kl_weight) { x.has_kl_weight = true; x.kl_weight = a.kl_weight[i]; }
  if (a.pg_weight) { x.has_pg_weight = true; x.pg_weight = a.pg_weight[i]; }
  return token_terms(a.logp[i], a.entropy[i], a.old[i], a.adv[i], x, p);
}

}  // namespace erpo
