"""The per-token loss as one autograd Function over [N]: (logp, entropy) -> per-token loss term.

Its forward runs the per-token kernel (Triton on CUDA, or under the interpreter when asked) or its torch
twin below, which returns the loss term and the analytic coefficients dloss/dlogp and dloss/dH; its
backward only multiplies them by the incoming gradient. Those two [N] vectors then go to the fused op's
backward, the only pass over the vocabulary. Everything else the loss needs (token advantage, KL-Cov
weights) arrives already computed and detached.
"""
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


@dataclass(frozen=True)
class TokenParams:
    eps_low: float
    eps_high: float
    dual_clip: bool
    dual_clip_c: float
    kl_coef: float
    kl_estimator: str
    entropy_coef: float
    no_clip: bool  # KL-Cov: the plain ratio surrogate, no PPO clip

    @property
    def kl_code(self) -> int:
        """The KL estimator as the kernels (Triton and CUDA) take it: 1, 2 or 3 for k1, k2, k3."""
        return {"k1": 1, "k2": 2, "k3": 3}[self.kl_estimator]


def token_terms_torch(logp, entropy, old, adv, ref: Optional[Tensor], klcov_w: Optional[Tensor], params: TokenParams):
    """Torch twin of kernels/policy_loss.py: same formulas, elementwise, in the inputs' float dtype."""
    log_ratio = logp - old
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    zero = torch.zeros_like(ratio)
    if params.no_clip:
        pg, dlogp = unclipped, unclipped
        clip_low = clip_high = torch.zeros_like(ratio, dtype=torch.bool)
    else:
        clipped = -adv * ratio.clamp(1.0 - params.eps_low, 1.0 + params.eps_high)
        pg = torch.maximum(unclipped, clipped)
        dlogp = torch.where(unclipped >= clipped, unclipped, zero)
        clip_low = (adv < 0) & (ratio < 1.0 - params.eps_low)
        clip_high = (adv > 0) & (ratio > 1.0 + params.eps_high)
        if params.dual_clip:
            bound = -params.dual_clip_c * adv
            capped = (adv < 0) & (pg > bound)
            pg = torch.where(capped, bound, pg)
            dlogp = torch.where(capped, zero, dlogp)
    loss = pg - params.entropy_coef * entropy
    if ref is not None:
        diff = logp - ref
        if params.kl_estimator == "k1":
            loss = loss + params.kl_coef * diff
            dlogp = dlogp + params.kl_coef
        elif params.kl_estimator == "k2":
            loss = loss + params.kl_coef * 0.5 * diff * diff
            dlogp = dlogp + params.kl_coef * diff
        else:
            back = torch.exp(-diff)
            loss = loss + params.kl_coef * (back + diff - 1.0)
            dlogp = dlogp + params.kl_coef * (1.0 - back)
    if klcov_w is not None:
        loss = loss + klcov_w * log_ratio.abs()
        dlogp = dlogp + klcov_w * torch.sign(log_ratio)
    dentropy = torch.full_like(loss, -params.entropy_coef)
    return loss, dlogp, dentropy, clip_low, clip_high


def token_terms(logp, entropy, old, adv, ref, klcov_w, params: TokenParams, backend: str):
    """Dispatch on float32 inputs: 'triton' runs kernels/policy_loss.py, 'cuda' csrc/policy_loss_token.cu;
    anything else (and float64) the torch twin."""
    if backend == "triton" and logp.dtype == torch.float32:
        from erpo.kernels import policy_loss as kernel

        args = [t if t is None else t.contiguous() for t in (logp, entropy, old, adv, ref, klcov_w)]
        return kernel.token_terms(*args, params)
    if backend == "cuda" and logp.dtype == torch.float32:
        from erpo.ops import cuda_logprobs_entropy

        return cuda_logprobs_entropy.token_terms(logp, entropy, old, adv, ref, klcov_w, params)
    return token_terms_torch(logp, entropy, old, adv, ref, klcov_w, params)


class TokenLossFunction(torch.autograd.Function):
    """(logp, entropy) -> (per-token loss, clip_low, clip_high); gradients from the precomputed coefficients."""

    @staticmethod
    def forward(ctx, logp, entropy, old, adv, ref, klcov_w, params, backend):
        loss, dlogp, dentropy, clip_low, clip_high = token_terms(logp, entropy, old, adv, ref, klcov_w, params, backend)
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
        return grad_logp, grad_entropy, None, None, None, None, None, None


def token_loss(logp, entropy, old, adv, ref, klcov_w, params: TokenParams, backend: str):
    return TokenLossFunction.apply(logp, entropy, old, adv, ref, klcov_w, params, backend)
