"""Naive reference of the policy losses: full log_softmax over the vocabulary, eager autograd, loops.

Written for clarity, not speed: it materialises [B, L, V] float32 probabilities and walks groups,
responses and buckets in Python. Tests check erpo.policy_loss against it; benchmarks use it as
"naive GRPO". Padded layout ([B, L, V] logits) only.
"""
import math
from types import SimpleNamespace
from typing import Optional

import torch
from torch import Tensor

from erpo.losses import controls as registry
from erpo.losses.config import LossConfig
from erpo.losses.policy_loss import LossResult

STD_EPS = 1e-6


def naive_logprobs_and_entropy(logits: Tensor, targets: Tensor, temperature: float = 1.0):
    """(logp, entropy) of softmax(logits / T) from a full log_softmax; float32 (float64 for float64 logits)."""
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    log_probs = torch.log_softmax(logits.to(dtype) / temperature, dim=-1)
    logp = log_probs.gather(-1, targets.clamp_min(0).long().unsqueeze(-1)).squeeze(-1)
    probs = log_probs.exp()
    entropy = -torch.where(probs > 0, probs * log_probs, torch.zeros_like(probs)).sum(-1)
    return logp, entropy


def _sequence_advantages(batch: dict, config: LossConfig, dtype) -> tuple[Tensor, int]:
    if batch.get("advantages") is not None:
        return batch["advantages"].to(dtype), 0
    rewards = batch["rewards"].to(dtype)
    ids = batch["group_ids"].tolist()
    advantages = torch.zeros_like(rewards)
    degenerate = 0
    for group in sorted(set(ids)):
        members = [i for i, g in enumerate(ids) if g == group]
        r = rewards[members]
        if len(members) == 1 or bool((r == r[0]).all()):
            degenerate += 1
            continue
        if config.adv_estimator == "grpo":
            a = (r - r.mean()) / (r.std(unbiased=True) + STD_EPS)
        elif config.adv_estimator == "dr_grpo":
            a = r - r.mean()
        else:  # rloo
            a = r - (r.sum() - r) / (len(members) - 1)
        advantages[members] = a
    return advantages, degenerate


def _rollout_weight(config, old, rollout, mask):
    log_w = torch.nan_to_num(torch.where(mask, old - rollout, torch.zeros_like(old)), nan=0.0)
    if config.rollout_is.startswith("sequence"):
        log_w = log_w.sum(1, keepdim=True).expand_as(old)
    raw = torch.exp(log_w)
    low = 0.0 if config.rollout_is_min is None else config.rollout_is_min
    high = math.inf if config.rollout_is_max is None else config.rollout_is_max
    if config.rollout_is.endswith("truncate"):
        return raw.clamp(low, high)
    return torch.where((raw < low) | (raw > high), torch.zeros_like(raw), raw)


def naive_policy_loss(
    logits: Tensor, batch: dict, config: LossConfig, generator: Optional[torch.Generator] = None
) -> LossResult:
    """Dense [B, L] reference of every objective x control x correction, gradients by autograd.

    Controls run in their declared order, each by its dense form (erpo/losses/controls/); the sequence ratio is verl's GSPO-token form sg(s_i) pi / sg(pi); GMPO is verl's
    geo_mean with autograd through the clamped log-ratios.
    """
    targets, mask = batch["targets"], batch["mask"].bool()
    B, L = mask.shape
    logp, entropy = naive_logprobs_and_entropy(logits, torch.where(mask, targets, 0), config.temperature)
    dtype = logp.dtype
    zero = torch.zeros((), dtype=dtype)
    old = torch.where(mask, batch["old_logp"].to(dtype), zero)
    ref = batch.get("ref_logp")
    ref = None if ref is None else torch.where(mask, ref.to(dtype), zero)
    rollout = batch.get("rollout_logp")
    rollout = None if rollout is None else torch.where(mask, rollout.to(dtype), zero)
    adv_seq, degenerate = _sequence_advantages(batch, config, dtype)
    a = torch.where(mask, adv_seq[:, None].expand(B, L), zero)
    n_valid = int(mask.sum())
    lp = logp.detach()
    H = entropy.detach()
    ratio_d = torch.exp(lp - old)
    # The dense state each control's naive form reads and changes (erpo/losses/controls/<name>.py, `naive`).
    dense = SimpleNamespace(batch=batch, mask=mask, logp=logp, lp=lp, H=H, old=old, ref=ref, adv_seq=adv_seq, a=a,
                            generator=generator, keep=torch.ones_like(a), klcov=torch.zeros_like(a),
                            masked=torch.zeros_like(mask), eps_low=torch.full_like(a, config.eps_low),
                            eps_high=torch.full_like(a, config.eps_high), kl_weight=torch.ones_like(a), metrics={})
    for control in registry.ordered(config.controls):
        if control.naive is not None:
            control.naive(config, dense)
    a, keep, klcov, masked = dense.a, dense.keep, dense.klcov, dense.masked
    eps_low, eps_high, kl_weight = dense.eps_low, dense.eps_high, dense.kl_weight

    lengths = mask.sum(1)
    log_ratio = torch.where(mask, logp - old, zero)
    if config.is_level == "sequence":
        seq_lr = log_ratio.detach().sum(1) / lengths.clamp_min(1)
        ratio = torch.exp(logp - lp + seq_lr[:, None])
    else:
        ratio = torch.exp(logp - old)
    pg_weight = torch.ones_like(a)
    rollout_w = None if config.rollout_is is None else torch.where(mask, _rollout_weight(config, old, rollout, mask), zero)

    objective = config.objective
    if objective == "plain":
        pg = -ratio * a
    elif objective == "clip":
        capped = ratio if config.delta is None else torch.clamp(ratio, max=config.delta)
        pg = -torch.minimum(capped * a, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * a)
        if config.dual_clip:
            pg = torch.where(a < 0, torch.minimum(pg, -config.dual_clip_c * a), pg)
    elif objective == "cispo":
        if config.cispo_clip == "upper":
            w = torch.clamp(ratio, max=config.cispo_max).detach()
        else:
            w = torch.clamp(ratio, 1 - config.eps_low, 1 + config.eps_high).detach()
        pg = -w * a * logp
    elif objective == "sapo":
        tau = torch.where(a > 0, config.sapo_tau_pos, config.sapo_tau_neg)
        pg = -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * a
    elif objective == "gpg":
        pg = -a * logp
    elif objective == "vespo":
        seq_log = torch.where(mask, torch.clamp(lp - old, -20.0, 20.0), zero).sum(1)
        if rollout_w is not None:
            seq_log = seq_log + torch.where(mask, torch.clamp(torch.log(rollout_w), math.log(1e-8), 20.0), zero).sum(1)
        log_w = torch.clamp(seq_log, math.log(1e-8), 20.0)
        k = torch.where(adv_seq >= 0, config.vespo_k_pos, config.vespo_k_neg)
        lam = torch.where(adv_seq >= 0, config.vespo_lambda_pos, config.vespo_lambda_neg).clamp_min(1e-4)
        phi = torch.nan_to_num(torch.exp(lam + k * log_w - lam * torch.exp(log_w)), nan=0.0, posinf=0.0, neginf=0.0)
        pg = -phi[:, None] * a * logp
        rollout_w = None  # folded into phi (TRL's rule)
    else:  # gmpo (verl geo_mean): one ratio per response from the sign-aware clamped log-ratios, with gradient
        sign = torch.sign(a)
        chosen = sign * torch.minimum(sign * log_ratio, sign * torch.clamp(log_ratio, -config.eps_low, config.eps_high))
        seq_ratio = torch.exp(torch.where(mask, chosen, zero).sum(1) / lengths.clamp_min(1))
        pg = -a * seq_ratio[:, None]
        if rollout_w is not None:
            rollout_w = torch.exp(torch.where(mask, torch.log(rollout_w + 1e-10), zero).sum(1) / lengths.clamp_min(1))[:, None]
    if rollout_w is not None:
        pg_weight = pg_weight * rollout_w
    if config.off_policy_mask is not None:
        behaviour = old if rollout is None else rollout
        seq_kl = torch.where(mask, torch.nan_to_num(behaviour - lp, nan=0.0), zero).sum(1) / lengths.clamp_min(1)
        pg_weight = pg_weight * ((adv_seq >= 0) | (seq_kl <= config.off_policy_mask)).to(dtype)[:, None]
    per_token = pg * pg_weight + klcov * (logp - old).abs()
    if config.kl_coef > 0:
        d = logp - ref
        kl = {"k1": d, "k2": 0.5 * d * d, "k3": torch.exp(-d) + d - 1}[config.kl_estimator]
        if config.kl_bias_correction:
            kl = ratio * kl
        per_token = per_token + config.kl_coef * kl_weight * kl
    per_token = torch.where(mask, per_token * keep, zero)

    num_items, num_seqs = batch.get("num_items_in_batch"), batch.get("num_seqs_in_batch")
    tokens = max(n_valid, 1) if num_items is None else float(num_items)  # an empty batch: loss 0, not 0 / 0
    if config.agg == "token-mean":
        loss = per_token.sum() / tokens
    elif config.agg == "seq-mean-token-mean":
        per_seq = [per_token[i].sum() / lengths[i] for i in range(B) if lengths[i] > 0]
        total = torch.stack(per_seq).sum() if per_seq else per_token.sum()
        loss = total / (max(len(per_seq), 1) if num_seqs is None else float(num_seqs))
    elif config.agg == "seq-mean-token-sum":
        loss = per_token.sum(1).sum() / (B if num_seqs is None else float(num_seqs))
    else:
        loss = per_token.sum() / ((B if num_seqs is None else float(num_seqs)) * (config.max_len or L))
    extra_bonus = {}
    if config.entropy_coef != 0:  # the mean entropy per valid token, whatever the aggregation (Clip-Cov: kept tokens)
        bonus = torch.where(mask, entropy * keep, zero).sum() / tokens
        loss = loss - config.entropy_coef * bonus
        extra_bonus["entropy_bonus"] = bonus

    r = ratio.detach()
    if objective == "clip":
        low_flag, high_flag = (a < 0) & (r < 1 - eps_low), (a > 0) & (r > 1 + eps_high)
    elif objective == "cispo":  # the weight is clamped whatever a's sign; counted on a's side (TRL, Liger)
        lo, hi = (0.0, config.cispo_max) if config.cispo_clip == "upper" else (1 - config.eps_low, 1 + config.eps_high)
        low_flag, high_flag = (a < 0) & (r < lo), (a > 0) & (r > hi)
    elif objective == "gmpo":  # verl: the log-ratio was clamped, split by the sign of a
        clipped = log_ratio.detach() != torch.clamp(log_ratio.detach(), -config.eps_low, config.eps_high)
        low_flag, high_flag = clipped & (a < 0), clipped & (a > 0)
    else:
        low_flag = high_flag = torch.zeros_like(mask)
    count = max(n_valid, 1)
    metrics = {
        "entropy": H[mask].sum() / count,
        "clip_frac_low": (mask & low_flag).sum() / count,
        "clip_frac_high": (mask & high_flag).sum() / count,
        "ratio_mean": ratio_d[mask].sum() / count,
        "approx_kl": (torch.exp(old - lp) - (old - lp) - 1)[mask].sum() / count,
        "masked_frac": masked.sum() / count,
        "n_valid_tokens": torch.tensor(n_valid),
        "n_empty_batches": torch.tensor(int(n_valid == 0)),
        **extra_bonus,
        "degenerate_groups": torch.tensor(degenerate),
        **dense.metrics,
    }
    return LossResult(loss=loss, metrics={k: v.detach() for k, v in metrics.items()})
