"""Triton kernel of the per-token part of the policy loss: one pass over [N] floats, no vocabulary.

It computes exactly what the torch twin, erpo.losses.token_loss.token_terms_torch (the CPU path and the
reference; `_surrogate` there holds each objective's formula), computes, per token t in float32:
  lr   = log_ratio[t] if given (sequence-level IS, GSPO-token form) else logp - old;  ratio = exp(lr)
  pg   = the objective's surrogate (clip with optional delta cap and dual clip, plain, cispo, sapo, vespo,
         gpg, gmpo), with eps_low/eps_high either scalars or per-token tensors (Archer)
  pg  *= pg_weight[t]                                         (rollout IS / off-policy mask)
  loss = pg - entropy_coef H + kl_coef w_kl[t] (ratio) k(logp, ref) + klcov_w |logp - old|
and the two coefficients the fused op's backward consumes, dloss/dlogp and dloss/dH, plus the clip flags.
Scalars are runtime arguments (no recompile when a controller moves eps_high or beta); the modes (objective,
dual clip, delta, cispo's clip, KL estimator and bias correction, which optional inputs exist) are constexpr.
min/max use PropagateNan.ALL so a NaN ratio never becomes a finite loss term on a GPU (where the default
min/max return the non-NaN operand; the interpreter's numpy propagates NaN either way).
"""
import torch
import triton
import triton.language as tl

BLOCK = 1024

# The OBJECTIVE constexpr's values, in the order of erpo.losses.objectives.Objective (the definition; a test in
# tests/csrc/test_host_token_loss.py holds these, the enum and csrc/token_loss_math.h's equal).
CLIP, PLAIN, CISPO, SAPO, VESPO, GPG, GMPO = (tl.constexpr(code) for code in range(7))
EXTRA_NAMES = ("log_ratio", "seq_coef", "eps_low", "eps_high", "kl_weight", "pg_weight")


@triton.jit
def policy_loss_token_kernel(
    logp_ptr, entropy_ptr, old_ptr, adv_ptr, ref_ptr, klcov_ptr,
    log_ratio_ptr, seq_coef_ptr, eps_low_ptr, eps_high_ptr, kl_weight_ptr, pg_weight_ptr,
    loss_ptr, dlogp_ptr, dentropy_ptr, clip_low_ptr, clip_high_ptr,
    n, eps_low, eps_high, clip_lo, clip_hi, dual_clip_c, kl_coef, entropy_coef, delta, cispo_max,
    sapo_tau_pos, sapo_tau_neg,
    OBJECTIVE: tl.constexpr, DUAL_CLIP: tl.constexpr, HAS_DELTA: tl.constexpr, CISPO_UPPER: tl.constexpr,
    HAS_REF: tl.constexpr, KL_EST: tl.constexpr, KL_BIAS: tl.constexpr, HAS_KLCOV: tl.constexpr,
    HAS_LOG_RATIO: tl.constexpr, HAS_SEQ_COEF: tl.constexpr, HAS_EPS_LOW: tl.constexpr,
    HAS_EPS_HIGH: tl.constexpr, HAS_KL_WEIGHT: tl.constexpr, HAS_PG_WEIGHT: tl.constexpr, BLOCK: tl.constexpr,
):
    nan_all: tl.constexpr = tl.PropagateNan.ALL
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = offs < n
    logp = tl.load(logp_ptr + offs, mask=live, other=0.0).to(tl.float32)
    entropy = tl.load(entropy_ptr + offs, mask=live, other=0.0).to(tl.float32)
    old = tl.load(old_ptr + offs, mask=live, other=0.0).to(tl.float32)
    a = tl.load(adv_ptr + offs, mask=live, other=0.0).to(tl.float32)
    token_log_ratio = logp - old
    if HAS_LOG_RATIO:
        log_ratio = tl.load(log_ratio_ptr + offs, mask=live, other=0.0).to(tl.float32)
    else:
        log_ratio = token_log_ratio
    ratio = tl.exp(log_ratio)
    zero = tl.zeros_like(ratio)
    # The clip range: per-token tensors (Archer) or the scalars; the band's bounds in the scalars' case come
    # from the host (1 - eps in float64, then float32, as torch compares a float32 tensor with a Python float).
    if HAS_EPS_LOW:
        e_low = tl.load(eps_low_ptr + offs, mask=live, other=0.0).to(tl.float32)
        lo = 1.0 - e_low
    else:
        e_low = eps_low
        lo = clip_lo
    if HAS_EPS_HIGH:
        e_high = tl.load(eps_high_ptr + offs, mask=live, other=0.0).to(tl.float32)
        hi = 1.0 + e_high
    else:
        e_high = eps_high
        hi = clip_hi
    if HAS_SEQ_COEF:
        seq_coef = tl.load(seq_coef_ptr + offs, mask=live, other=0.0).to(tl.float32)
    else:
        seq_coef = zero
    clip_low = live & (zero != zero)  # all False, shaped as a flag
    clip_high = clip_low
    if OBJECTIVE == CLIP:
        if HAS_DELTA:
            unclipped = -a * tl.minimum(ratio, delta, propagate_nan=nan_all)
            d_unclipped = tl.where(ratio < delta, unclipped, 0.0)
        else:
            unclipped = -a * ratio
            d_unclipped = unclipped
        clipped = -a * tl.minimum(tl.maximum(ratio, lo, propagate_nan=nan_all), hi, propagate_nan=nan_all)
        pg = tl.maximum(unclipped, clipped, propagate_nan=nan_all)
        dlogp = tl.where(unclipped >= clipped, d_unclipped, 0.0)
        clip_low = (a < 0) & (ratio < lo)
        clip_high = (a > 0) & (ratio > hi)
        if DUAL_CLIP:
            bound = -dual_clip_c * a
            capped = (a < 0) & (pg > bound)
            pg = tl.where(capped, bound, pg)
            dlogp = tl.where(capped, 0.0, dlogp)
    elif OBJECTIVE == PLAIN:  # KL-Cov's: the ratio surrogate without the clip
        pg = -a * ratio
        dlogp = pg
    elif OBJECTIVE == CISPO:  # the detached, clipped ratio weighs the log-prob
        if CISPO_UPPER:
            weight = tl.minimum(ratio, cispo_max, propagate_nan=nan_all)
            clip_low = (a < 0) & (ratio < 0.0)
            clip_high = (a > 0) & (ratio > cispo_max)
        else:
            weight = tl.minimum(tl.maximum(ratio, lo, propagate_nan=nan_all), hi, propagate_nan=nan_all)
            clip_low = (a < 0) & (ratio < lo)
            clip_high = (a > 0) & (ratio > hi)
        dlogp = -weight * a
        pg = dlogp * logp
    elif OBJECTIVE == SAPO:  # a soft gate sigmoid(tau (r - 1)) 4 / tau in place of the clip
        tau = tl.where(a > 0, sapo_tau_pos, sapo_tau_neg)
        gate = tl.sigmoid(tau * (ratio - 1.0))
        pg = -a * gate * 4.0 / tau
        dlogp = -a * 4.0 * gate * (1.0 - gate) * ratio
    elif OBJECTIVE == VESPO:  # the response's detached weight phi on the log-prob
        dlogp = -seq_coef * a
        pg = dlogp * logp
    elif OBJECTIVE == GPG:  # -a logp
        dlogp = -a
        pg = dlogp * logp
    else:  # GMPO: gradient where sign(a) min(sign(a) lr, sign(a) clip(lr)) picks the unclipped log-ratio
        clamped = tl.minimum(tl.maximum(log_ratio, -e_low, propagate_nan=nan_all), e_high, propagate_nan=nan_all)
        sign = tl.where(a > 0, 1.0, tl.where(a < 0, -1.0, 0.0))  # torch.sign: 0 for 0 and NaN
        open_ = sign * log_ratio <= sign * clamped
        was_clipped = log_ratio != clamped  # True on NaN, as torch's !=
        pg = -a * seq_coef
        dlogp = tl.where(open_, pg, 0.0)
        clip_low = was_clipped & (a < 0)
        clip_high = was_clipped & (a > 0)
    if HAS_PG_WEIGHT:
        pg_weight = tl.load(pg_weight_ptr + offs, mask=live, other=0.0).to(tl.float32)
        pg = pg * pg_weight
        dlogp = dlogp * pg_weight
    loss = pg - entropy_coef * entropy
    if HAS_REF:
        ref = tl.load(ref_ptr + offs, mask=live, other=0.0).to(tl.float32)
        diff = logp - ref
        if KL_EST == 1:
            kl = diff
            dkl = zero + 1.0
        elif KL_EST == 2:
            kl = 0.5 * diff * diff
            dkl = diff
        else:
            back = tl.exp(-diff)  # exp(ref - logp)
            kl = back + diff - 1.0
            dkl = 1.0 - back
        if HAS_KL_WEIGHT:
            coef = kl_coef * tl.load(kl_weight_ptr + offs, mask=live, other=0.0).to(tl.float32)
        else:
            coef = kl_coef
        if KL_BIAS:  # d/dlogp [r kl] = r kl + r dkl (the ratio is not detached)
            dkl = ratio * (kl + dkl)
            kl = ratio * kl
        loss = loss + coef * kl
        dlogp = dlogp + coef * dkl
    if HAS_KLCOV:
        beta = tl.load(klcov_ptr + offs, mask=live, other=0.0).to(tl.float32)
        loss = loss + beta * tl.abs(token_log_ratio)
        dlogp = dlogp + beta * tl.where(token_log_ratio > 0, 1.0, tl.where(token_log_ratio < 0, -1.0, 0.0))
    tl.store(loss_ptr + offs, loss, mask=live)
    tl.store(dlogp_ptr + offs, dlogp, mask=live)
    tl.store(dentropy_ptr + offs, zero - entropy_coef, mask=live)
    tl.store(clip_low_ptr + offs, clip_low.to(tl.int8), mask=live)
    tl.store(clip_high_ptr + offs, clip_high.to(tl.int8), mask=live)


def token_terms(logp, entropy, old, adv, ref, klcov_w, params, extras=None):
    """Flat float32 [N] (loss, dloss/dlogp, dloss/dH, clip_low bool, clip_high bool); see the module doc.
    `extras` is a TokenParams' TokenExtras (or None); every tensor is a contiguous float32 [N]."""
    n = logp.numel()
    given = {name: getattr(extras, name, None) for name in EXTRA_NAMES}
    named = {"entropy": entropy, "old": old, "adv": adv, "ref": ref, "klcov_w": klcov_w, **given}
    for name, tensor in named.items():
        if tensor is not None and tensor.numel() != n:  # the kernel reads n values of each: no broadcasting
            raise ValueError(f"per-token input {name} has {tensor.numel()} values, expected one per token ({n})")
    code = params.objective_code
    if code in (VESPO.value, GMPO.value) and given["seq_coef"] is None:
        raise ValueError(f"objective {params.objective!r} needs TokenExtras.seq_coef (the response's weight)")
    out = [torch.empty(n, dtype=torch.float32, device=logp.device) for _ in range(3)]
    flags = [torch.empty(n, dtype=torch.int8, device=logp.device) for _ in range(2)]
    if n:
        def pointer(t):  # an absent input is never read (its HAS_ flag is off); any valid pointer stands in
            return logp if t is None else t

        policy_loss_token_kernel[(triton.cdiv(n, BLOCK),)](
            logp, entropy, old, adv, pointer(ref), pointer(klcov_w), *(pointer(given[name]) for name in EXTRA_NAMES),
            *out, *flags,
            n, *(float(x) for x in (
                params.eps_low, params.eps_high, 1.0 - params.eps_low, 1.0 + params.eps_high, params.dual_clip_c,
                params.kl_coef, params.entropy_coef, 0.0 if params.delta is None else params.delta,
                params.cispo_max, params.sapo_tau_pos, params.sapo_tau_neg)),
            OBJECTIVE=code, DUAL_CLIP=params.dual_clip, HAS_DELTA=params.delta is not None,
            CISPO_UPPER=params.cispo_clip == "upper", HAS_REF=ref is not None, KL_EST=params.kl_code,
            KL_BIAS=params.kl_bias_correction, HAS_KLCOV=klcov_w is not None,
            HAS_LOG_RATIO=given["log_ratio"] is not None, HAS_SEQ_COEF=given["seq_coef"] is not None,
            HAS_EPS_LOW=given["eps_low"] is not None, HAS_EPS_HIGH=given["eps_high"] is not None,
            HAS_KL_WEIGHT=given["kl_weight"] is not None, HAS_PG_WEIGHT=given["pg_weight"] is not None,
            BLOCK=BLOCK,
        )
    return (*out, flags[0].view(torch.bool), flags[1].view(torch.bool))
