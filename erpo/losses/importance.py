"""Importance weights over [N] tokens and [S] responses: the sequence-level ratio (GSPO), rollout
correction (truncated / masked IS against the inference engine's log-probs), the off-policy sequence
mask, and the per-response weights of VESPO and GMPO.

Everything is detached (these are coefficients, never differentiated), fixed-shape and sync-free.
Formulas and sources: docs/losses.md ("Importance weights").
"""
import math
from typing import Optional

import torch
from torch import Tensor

from erpo.losses.config import LossConfig
from erpo.losses.segments import segment_sum
from erpo.losses.token_loss import TokenExtras

LOG_MIN = math.log(1e-8)  # VESPO's floor of a log weight (TRL/Liger get_gamma_weights)


def _valid(values: Tensor, valid: Tensor) -> Tensor:
    return torch.where(valid, values, torch.zeros_like(values))


def _seq_mean(values: Tensor, seq: Tensor, valid: Tensor, n_seqs: int) -> Tensor:
    lengths = segment_sum(valid.to(values.dtype), seq, n_seqs)
    return segment_sum(_valid(values, valid), seq, n_seqs) / lengths.clamp_min(1)


def sequence_log_ratio(logp: Tensor, old: Tensor, seq: Tensor, valid: Tensor, n_seqs: int) -> Tensor:
    """[N] log s_i of each token's response: the mean log-ratio over its valid tokens (GSPO)."""
    return _seq_mean(logp - old, seq, valid, n_seqs)[seq]


def rollout_weights(config: LossConfig, old: Tensor, rollout: Tensor, seq: Tensor, valid: Tensor, n_seqs: int):
    """Rollout IS weight exp(old - rollout) per token (token_*) or per response (sequence_*: summed log-ratio),
    truncated to [min, max] (*_truncate) or set to 0 outside it (*_mask), as TRL's vLLM correction.
    Returns ([N] weight, metrics). A token the engine could not score (NaN rollout log-prob) gets log weight 0:
    no correction (TRL's rule)."""
    log_w = torch.nan_to_num(_valid(old - rollout, valid), nan=0.0)
    if config.rollout_is.startswith("sequence"):
        log_w = segment_sum(log_w, seq, n_seqs)[seq]
    raw = torch.exp(log_w)
    low = 0.0 if config.rollout_is_min is None else config.rollout_is_min
    high = math.inf if config.rollout_is_max is None else config.rollout_is_max
    outside = valid & ((raw < low) | (raw > high))
    if config.rollout_is.endswith("truncate"):
        weight = raw.clamp(min=low, max=high)
    else:
        weight = torch.where(outside, torch.zeros_like(raw), raw)
    weight = _valid(weight, valid)
    n_valid = valid.sum().clamp_min(1)
    kind = "truncated" if config.rollout_is.endswith("truncate") else "masked"
    metrics = {
        "rollout_is_mean": weight.sum() / n_valid,
        "rollout_is_max": _valid(raw, valid).amax() if raw.numel() else raw.new_zeros(()),
        f"rollout_is_{kind}_frac": outside.sum() / n_valid,
    }
    return weight, metrics


def off_policy_keep(config: LossConfig, logp: Tensor, behaviour: Tensor, seq_adv: Tensor, seq: Tensor,
                    valid: Tensor, n_seqs: int):
    """DeepSeek-V3.2's off-policy sequence mask: keep a response if a >= 0 or its mean KL
    (behaviour - logp, over valid tokens) <= threshold. Returns ([N] 0/1 keep, metrics)."""
    kl = torch.nan_to_num(behaviour - logp, nan=0.0)
    mean_kl = _seq_mean(kl, seq, valid, n_seqs)
    keep_seq = (seq_adv >= 0) | (mean_kl <= config.off_policy_mask)
    nonempty = segment_sum(valid.to(logp.dtype), seq, n_seqs) > 0
    dropped = (nonempty & ~keep_seq).sum() / nonempty.sum().clamp_min(1)
    return keep_seq[seq].to(logp.dtype), {"off_policy_masked_frac": dropped}


def vespo_phi(config: LossConfig, logp: Tensor, old: Tensor, seq_adv: Tensor, seq: Tensor, valid: Tensor,
              n_seqs: int, rollout_weight: Optional[Tensor]) -> Tensor:
    """VESPO's gamma weight phi(w) = e^lambda w^k e^(-lambda w) of the sequence ratio w (sum of clamped token
    log-ratios, plus the logs of the token rollout IS weights when given), in log space; [N] per token
    (TRL get_gamma_weights)."""
    seq_log = segment_sum(_valid(torch.clamp(logp - old, -20.0, 20.0), valid), seq, n_seqs)
    if rollout_weight is not None:
        log_is = torch.clamp(torch.log(rollout_weight), LOG_MIN, 20.0)
        seq_log = seq_log + segment_sum(_valid(log_is, valid), seq, n_seqs)
    log_w = torch.clamp(seq_log, LOG_MIN, 20.0)
    nonneg = seq_adv >= 0
    k = torch.where(nonneg, config.vespo_k_pos, config.vespo_k_neg).to(logp.dtype)
    lam = torch.where(nonneg, config.vespo_lambda_pos, config.vespo_lambda_neg).to(logp.dtype).clamp_min(1e-4)
    phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
    return torch.nan_to_num(phi, nan=0.0, posinf=0.0, neginf=0.0)[seq]


def gmpo_ratio(config: LossConfig, logp: Tensor, old: Tensor, adv: Tensor, seq: Tensor, valid: Tensor,
               n_seqs: int) -> Tensor:
    """GMPO's per-response ratio exp(mean_t sign(a) min(sign(a) lr_t, sign(a) clip(lr_t, -eps_low, eps_high)));
    [N] per token (verl compute_policy_loss_geo_mean)."""
    log_ratio = logp - old
    sign = torch.sign(adv)
    clamped = torch.clamp(log_ratio, -config.eps_low, config.eps_high)
    chosen = sign * torch.minimum(sign * log_ratio, sign * clamped)
    return torch.exp(_seq_mean(chosen, seq, valid, n_seqs))[seq]


def geometric_mean_per_response(weight: Tensor, seq: Tensor, valid: Tensor, n_seqs: int) -> Tensor:
    """[N] geometric mean of a token weight over each response's valid tokens (verl's rollout IS under GMPO)."""
    return torch.exp(_seq_mean(torch.log(weight + 1e-10), seq, valid, n_seqs))[seq]


def token_extras(config: LossConfig, tokens, rollout: Optional[Tensor], shaping) -> tuple[TokenExtras, dict]:
    """The [N] inputs of the per-token loss that the objective, the importance level and the corrections add:
    the sequence log-ratio (is_level='sequence'), VESPO's / GMPO's per-response weight, the policy-gradient
    weight (rollout IS, off-policy mask) and the controls' per-token clip ranges and KL weights."""
    logp, old, seq, valid, n_seqs = tokens.logp, tokens.old, tokens.seq, tokens.valid, tokens.n_seqs
    extras = TokenExtras(eps_low=shaping.eps_low, eps_high=shaping.eps_high, kl_weight=shaping.kl_weight)
    metrics: dict = {}
    if config.is_level == "sequence":
        extras.log_ratio = sequence_log_ratio(logp, old, seq, valid, n_seqs)
        metrics["seq_ratio_mean"] = torch.exp(_seq_mean(logp - old, seq, valid, n_seqs)).mean()
    rollout_weight = None
    if config.rollout_is is not None:
        rollout_weight, rollout_metrics = rollout_weights(config, old, rollout, seq, valid, n_seqs)
        metrics.update(rollout_metrics)
    pg_weight = None
    if config.objective == "vespo":
        extras.seq_coef = vespo_phi(config, logp, old, tokens.seq_adv, seq, valid, n_seqs, rollout_weight)
        metrics["vespo_phi_mean"] = _seq_mean(extras.seq_coef, seq, valid, n_seqs).mean()
    elif config.objective == "gmpo":
        extras.seq_coef = gmpo_ratio(config, logp, old, shaping.adv, seq, valid, n_seqs)
        if rollout_weight is not None:
            pg_weight = geometric_mean_per_response(rollout_weight, seq, valid, n_seqs)
    elif rollout_weight is not None:
        pg_weight = rollout_weight
    if config.off_policy_mask is not None:
        behaviour = old if rollout is None else rollout
        keep, mask_metrics = off_policy_keep(config, logp, behaviour, tokens.seq_adv, seq, valid, n_seqs)
        pg_weight = keep if pg_weight is None else pg_weight * keep
        metrics.update(mask_metrics)
    extras.pg_weight = pg_weight
    return extras, metrics
