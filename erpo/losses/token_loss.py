"""The per-token loss as one autograd Function over [N]: (logp, entropy) -> per-token loss term.

Its forward runs a per-token kernel (Triton on CUDA or under the interpreter when asked, or the CUDA C++
one of csrc/) for every objective, param and TokenExtras field on float32 inputs, or else its torch twin
below; each returns the loss term and the analytic coefficients dloss/dlogp and dloss/dH. Its
backward only multiplies them by the incoming gradient. Those two [N] vectors then go to the fused op's
backward, the only pass over the vocabulary. Everything else the loss needs (token advantage, KL-Cov
weights) arrives already computed and detached.
"""
import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from erpo.losses.objectives import Objective


@dataclass(frozen=True)
class TokenParams:
    eps_low: float
    eps_high: float
    dual_clip: bool
    dual_clip_c: float
    kl_coef: float
    kl_estimator: str
    entropy_coef: float
    objective: str = "clip"  # a LossConfig.objective name (erpo/losses/objectives.py)
    delta: Optional[float] = None  # cap of the unclipped ratio (INTELLECT-2)
    kl_bias_correction: bool = False  # KL term times the importance ratio (DeepSeek-V3.2)
    cispo_clip: str = "upper"
    cispo_max: float = 5.0
    sapo_tau_pos: float = 1.0
    sapo_tau_neg: float = 1.05

    @property
    def kl_code(self) -> int:
        """The KL estimator as the kernels (Triton and CUDA) take it: 1, 2 or 3 for k1, k2, k3."""
        return {"k1": 1, "k2": 2, "k3": 3}[self.kl_estimator]

    @property
    def objective_code(self) -> int:
        """The objective as the kernels (Triton, CUDA) take it: its Objective value."""
        return int(Objective[self.objective.upper()])


@dataclass
class TokenExtras:
    """[N] detached inputs some objectives and controls add; None = absent."""

    log_ratio: Optional[Tensor] = None  # the importance log-ratio's value when it is not logp - old (GSPO: log s_i)
    seq_coef: Optional[Tensor] = None  # the response's detached weight: VESPO's phi, GMPO's geometric-mean ratio
    eps_low: Optional[Tensor] = None  # per-token clip range (Archer)
    eps_high: Optional[Tensor] = None
    kl_weight: Optional[Tensor] = None  # per-token multiplier of kl_coef (Archer)
    pg_weight: Optional[Tensor] = None  # per-token multiplier of the policy-gradient term only (rollout IS, off-policy mask)


def _surrogate(logp, log_ratio, ratio, adv, params: TokenParams, extras: TokenExtras):
    """The objective's policy-gradient term, its derivative w.r.t. logp and the clip flags, per token.

    Every ratio here has d ratio / d logp = ratio (token level: r = exp(logp - old); sequence level in the
    GSPO-token form: s_it = sg(s_i) exp(logp - sg(logp))), so each token's gradient stays on that token.
    """
    zero = torch.zeros_like(ratio)
    no_flag = torch.zeros_like(ratio, dtype=torch.bool)
    eps_low = params.eps_low if extras.eps_low is None else extras.eps_low
    eps_high = params.eps_high if extras.eps_high is None else extras.eps_high
    objective = params.objective
    if objective == "plain":
        pg = -adv * ratio
        return pg, pg, no_flag, no_flag
    if objective == "clip":
        capped_ratio = ratio if params.delta is None else torch.clamp(ratio, max=params.delta)
        unclipped = -adv * capped_ratio
        d_unclipped = unclipped if params.delta is None else torch.where(ratio < params.delta, unclipped, zero)
        clipped = -adv * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)  # eps: floats, or [N] tensors (Archer)
        pg = torch.maximum(unclipped, clipped)
        dlogp = torch.where(unclipped >= clipped, d_unclipped, zero)
        clip_low = (adv < 0) & (ratio < 1.0 - eps_low)
        clip_high = (adv > 0) & (ratio > 1.0 + eps_high)
        if params.dual_clip:
            bound = -params.dual_clip_c * adv
            capped = (adv < 0) & (pg > bound)
            pg = torch.where(capped, bound, pg)
            dlogp = torch.where(capped, zero, dlogp)
        return pg, dlogp, clip_low, clip_high
    if objective == "cispo":
        if params.cispo_clip == "upper":
            low, high = 0.0, params.cispo_max
            weight = torch.clamp(ratio, max=high)
        else:
            low, high = 1.0 - eps_low, 1.0 + eps_high
            weight = torch.clamp(ratio, low, high)
        # The weight is capped whatever the sign of a; the clip flags count, as every objective's (and TRL's
        # cispo_clip_ratio, Liger's is_clipped), only the side that binds for a's sign: a > 0 above the cap, a < 0 below.
        return -weight * adv * logp, -weight * adv, (adv < 0) & (ratio < low), (adv > 0) & (ratio > high)
    if objective == "sapo":
        tau = torch.where(adv > 0, params.sapo_tau_pos, params.sapo_tau_neg).to(ratio.dtype)
        gate = torch.sigmoid(tau * (ratio - 1.0))
        # d/dr [sigmoid(tau (r - 1)) 4 / tau] = 4 sigmoid (1 - sigmoid); times dr/dlogp = r
        return -adv * gate * 4.0 / tau, -adv * 4.0 * gate * (1.0 - gate) * ratio, no_flag, no_flag
    if objective == "vespo":
        return -extras.seq_coef * adv * logp, -extras.seq_coef * adv, no_flag, no_flag
    if objective == "gpg":
        return -adv * logp, -adv, no_flag, no_flag
    if objective == "gmpo":
        # Token t enters the response's geometric mean through sign(a) min(sign(a) lr, sign(a) clip(lr)):
        # its gradient flows where that min picks the unclipped log-ratio.
        clamped = torch.clamp(log_ratio, -eps_low, eps_high)
        sign = torch.sign(adv)
        open_ = sign * log_ratio <= sign * clamped
        clipped = log_ratio != clamped
        pg = -adv * extras.seq_coef
        return pg, torch.where(open_, pg, zero), clipped & (adv < 0), clipped & (adv > 0)
    raise ValueError(f"unknown objective {objective!r}")


def kl_terms(diff, estimator: str):
    """(kl, d kl / d logp) of the estimator at diff = logp - ref: k1 diff, k2 diff^2 / 2, k3 e^-diff + diff - 1."""
    if estimator == "k1":
        return diff, torch.ones_like(diff)
    if estimator == "k2":
        return 0.5 * diff * diff, diff
    back = torch.exp(-diff)
    return back + diff - 1.0, 1.0 - back


def token_terms_torch(logp, entropy, old, adv, ref: Optional[Tensor], klcov_w: Optional[Tensor], params: TokenParams,
                      extras: Optional[TokenExtras] = None):
    """Torch twin of kernels/policy_loss.py and the reference of every objective: elementwise, in the inputs'
    float dtype, returning (loss, dloss/dlogp, dloss/dH, clip_low, clip_high)."""
    extras = extras if extras is not None else TokenExtras()
    log_ratio = logp - old
    is_log_ratio = log_ratio if extras.log_ratio is None else extras.log_ratio
    ratio = torch.exp(is_log_ratio)
    pg, dlogp, clip_low, clip_high = _surrogate(logp, is_log_ratio, ratio, adv, params, extras)
    if extras.pg_weight is not None:
        pg, dlogp = pg * extras.pg_weight, dlogp * extras.pg_weight
    loss = pg - params.entropy_coef * entropy
    if ref is not None:
        kl, dkl = kl_terms(logp - ref, params.kl_estimator)
        coef = params.kl_coef if extras.kl_weight is None else params.kl_coef * extras.kl_weight
        if params.kl_bias_correction:  # d/dlogp [r kl] = r kl + r dkl (the ratio is not detached)
            kl, dkl = ratio * kl, ratio * (kl + dkl)
        loss = loss + coef * kl
        dlogp = dlogp + coef * dkl
    if klcov_w is not None:
        loss = loss + klcov_w * log_ratio.abs()
        dlogp = dlogp + klcov_w * torch.sign(log_ratio)
    dentropy = torch.full_like(loss, -params.entropy_coef)
    return loss, dlogp, dentropy, clip_low, clip_high


def token_terms(logp, entropy, old, adv, ref, klcov_w, params: TokenParams, backend: str,
                extras: Optional[TokenExtras] = None):
    """Dispatch: on float32 inputs 'triton' runs kernels/policy_loss.py and 'cuda' csrc/policy_loss_token.cu, for
    every objective, param and TokenExtras field. The torch twin runs on the 'torch' backend and on other dtypes
    (it is the float64 reference and computes in the inputs' dtype, which the float32 kernels cannot)."""
    extras = extras if extras is not None else TokenExtras()
    tensors = [t for t in (logp, entropy, old, adv, ref, klcov_w) if t is not None]
    tensors += [t for t in (getattr(extras, f.name) for f in dataclasses.fields(extras)) if t is not None]
    float32 = all(t.dtype == torch.float32 for t in tensors)
    if backend == "triton" and float32:
        from erpo.kernels import policy_loss as kernel

        def flat(t):
            return None if t is None else t.reshape(-1).contiguous()

        args = [flat(t) for t in (logp, entropy, old, adv, ref, klcov_w)]
        flat_extras = TokenExtras(**{f.name: flat(getattr(extras, f.name)) for f in dataclasses.fields(extras)})
        return kernel.token_terms(*args, params, flat_extras)
    if backend == "cuda" and float32:
        from erpo.ops import cuda_token_loss

        return cuda_token_loss.token_terms(logp, entropy, old, adv, ref, klcov_w, params, extras)
    return token_terms_torch(logp, entropy, old, adv, ref, klcov_w, params, extras)


class TokenLossFunction(torch.autograd.Function):
    """(logp, entropy) -> (per-token loss, clip_low, clip_high); gradients from the precomputed coefficients."""

    @staticmethod
    def forward(ctx, logp, entropy, old, adv, ref, klcov_w, params, backend, extras):
        loss, dlogp, dentropy, clip_low, clip_high = token_terms(
            logp, entropy, old, adv, ref, klcov_w, params, backend, extras)
        ctx.save_for_backward(dlogp, dentropy)
        ctx.entropy_grad = params.entropy_coef != 0
        ctx.mark_non_differentiable(clip_low, clip_high)
        return loss, clip_low, clip_high

    @staticmethod
    def backward(ctx, grad_loss, _clip_low, _clip_high):
        dlogp, dentropy = ctx.saved_tensors
        grad_logp = grad_loss * dlogp
        # No entropy term: return None so the fused backward skips the entropy part of its pass.
        grad_entropy = grad_loss * dentropy if ctx.entropy_grad and ctx.needs_input_grad[1] else None
        return grad_logp, grad_entropy, None, None, None, None, None, None, None


def token_loss(logp, entropy, old, adv, ref, klcov_w, params: TokenParams, backend: str,
               extras: Optional[TokenExtras] = None):
    return TokenLossFunction.apply(logp, entropy, old, adv, ref, klcov_w, params, backend, extras)
