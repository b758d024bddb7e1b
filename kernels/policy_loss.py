"""Triton kernel of the per-token part of the policy loss: one pass over [N] floats, no vocabulary.

Per token t (all float32): ratio = exp(logp - old),
  pg   = -min(ratio a, clip(ratio, 1 - eps_low, 1 + eps_high) a)        (NO_CLIP: pg = -ratio a)
  pg   = min(pg, -c a) where a < 0                                         (DUAL_CLIP)
  loss = pg + kl_coef k(logp, ref) - entropy_coef H + klcov_w |logp - old|
and the two coefficients the fused op's backward consumes, dloss/dlogp and dloss/dH, plus the clip
indicators (low: a < 0 and ratio < 1 - eps_low; high: a > 0 and ratio > 1 + eps_high).
Scalars are runtime arguments (no recompile when a controller moves eps_high or beta); the modes
(clip or not, dual clip, KL estimator, which optional inputs exist) are constexpr.
The torch twin, erpo.losses.token_loss.token_terms_torch, is the CPU path and the reference.
"""
import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def policy_loss_token_kernel(
    logp_ptr, entropy_ptr, old_ptr, adv_ptr, ref_ptr, klcov_ptr,
    loss_ptr, dlogp_ptr, dentropy_ptr, clip_low_ptr, clip_high_ptr,
    n, eps_low, eps_high, dual_clip_c, kl_coef, entropy_coef,
    NO_CLIP: tl.constexpr, DUAL_CLIP: tl.constexpr, HAS_REF: tl.constexpr, KL_EST: tl.constexpr,
    HAS_KLCOV: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = offs < n
    logp = tl.load(logp_ptr + offs, mask=live, other=0.0).to(tl.float32)
    entropy = tl.load(entropy_ptr + offs, mask=live, other=0.0).to(tl.float32)
    old = tl.load(old_ptr + offs, mask=live, other=0.0).to(tl.float32)
    a = tl.load(adv_ptr + offs, mask=live, other=0.0).to(tl.float32)
    log_ratio = logp - old
    ratio = tl.exp(log_ratio)
    unclipped = -a * ratio
    zero = tl.zeros_like(ratio)
    if NO_CLIP:
        pg = unclipped
        dlogp = unclipped
        clip_low = zero
        clip_high = zero
    else:
        # PropagateNan.ALL: on a GPU the default min/max return the non-NaN operand, which would turn a NaN
        # ratio into a finite loss term (the interpreter's numpy propagates NaN either way).
        nan_all: tl.constexpr = tl.PropagateNan.ALL
        clipped = -a * tl.minimum(tl.maximum(ratio, 1.0 - eps_low, propagate_nan=nan_all), 1.0 + eps_high, propagate_nan=nan_all)
        pg = tl.maximum(unclipped, clipped, propagate_nan=nan_all)
        dlogp = tl.where(unclipped >= clipped, unclipped, 0.0)
        clip_low = tl.where((a < 0) & (ratio < 1.0 - eps_low), 1.0, 0.0)
        clip_high = tl.where((a > 0) & (ratio > 1.0 + eps_high), 1.0, 0.0)
        if DUAL_CLIP:
            bound = -dual_clip_c * a
            capped = (a < 0) & (pg > bound)
            pg = tl.where(capped, bound, pg)
            dlogp = tl.where(capped, 0.0, dlogp)
    loss = pg - entropy_coef * entropy
    if HAS_REF:
        ref = tl.load(ref_ptr + offs, mask=live, other=0.0).to(tl.float32)
        diff = logp - ref
        if KL_EST == 1:
            loss += kl_coef * diff
            dlogp += kl_coef
        elif KL_EST == 2:
            loss += kl_coef * 0.5 * diff * diff
            dlogp += kl_coef * diff
        else:
            back = tl.exp(-diff)  # exp(ref - logp)
            loss += kl_coef * (back + diff - 1.0)
            dlogp += kl_coef * (1.0 - back)
    if HAS_KLCOV:
        beta = tl.load(klcov_ptr + offs, mask=live, other=0.0).to(tl.float32)
        loss += beta * tl.abs(log_ratio)
        dlogp += beta * tl.where(log_ratio > 0, 1.0, tl.where(log_ratio < 0, -1.0, 0.0))
    tl.store(loss_ptr + offs, loss, mask=live)
    tl.store(dlogp_ptr + offs, dlogp, mask=live)
    tl.store(dentropy_ptr + offs, zero - entropy_coef, mask=live)
    tl.store(clip_low_ptr + offs, clip_low.to(tl.int8), mask=live)
    tl.store(clip_high_ptr + offs, clip_high.to(tl.int8), mask=live)


def token_terms(logp, entropy, old, adv, ref, klcov_w, params):
    """Flat float32 [N] (loss, dloss/dlogp, dloss/dH, clip_low bool, clip_high bool); see the module doc."""
    n = logp.numel()
    out = [torch.empty(n, dtype=torch.float32, device=logp.device) for _ in range(3)]
    flags = [torch.empty(n, dtype=torch.int8, device=logp.device) for _ in range(2)]
    if n:
        policy_loss_token_kernel[(triton.cdiv(n, BLOCK),)](
            logp, entropy, old, adv, ref if ref is not None else logp, klcov_w if klcov_w is not None else logp,
            *out, *flags,
            n, params.eps_low, params.eps_high, params.dual_clip_c, params.kl_coef, params.entropy_coef,
            NO_CLIP=params.no_clip, DUAL_CLIP=params.dual_clip, HAS_REF=ref is not None,
            KL_EST=params.kl_code, HAS_KLCOV=klcov_w is not None, BLOCK=BLOCK,
        )
    return (*out, flags[0].view(torch.bool), flags[1].view(torch.bool))
