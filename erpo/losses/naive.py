"""Naive reference of the policy losses: full log_softmax over the vocabulary, eager autograd, loops.

Written for clarity, not speed: it materialises [B, L, V] float32 probabilities and walks groups,
responses and buckets in Python. Tests check erpo.policy_loss against it; benchmarks use it as
"naive GRPO". Padded layout ([B, L, V] logits) only.
"""
import math
from typing import Optional

import torch
from torch import Tensor

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


def _population_normalize(values: list) -> list:
    """(x - mean) / (std + 1e-6) with the population std; one value gives 0."""
    t = torch.stack(values)
    return list((t - t.mean()) / (t.std(unbiased=False) + STD_EPS))


def _erpo_token_advantages(config, batch, mask, entropy, adv_seq, old, ref):
    B, L = mask.shape
    ids = batch["group_ids"].tolist()
    H = entropy.detach()
    gate = torch.zeros_like(H)
    alpha = torch.ones_like(H)
    shaped = torch.zeros_like(H)
    for group in sorted(set(ids)):
        members = [i for i, g in enumerate(ids) if g == group]
        cells = [(i, t) for i in members for t in range(L) if mask[i, t]]
        if not cells:
            continue
        z = _population_normalize([H[i, t] for i, t in cells])
        for (i, t), zi in zip(cells, z):
            gate[i, t] = torch.sigmoid(config.gamma * zi)
        buckets = {}
        for i in members:
            positions = [t for t in range(L) if mask[i, t]]
            n = len(positions)
            total_gate = sum(gate[i, t] for t in positions) if positions else 0
            for pos, t in enumerate(positions):
                if config.gate == "redistribute":
                    alpha[i, t] = n * gate[i, t] / total_gate
                elif config.gate == "amplify":
                    alpha[i, t] = 1 + config.gate_lambda * gate[i, t]
                buckets.setdefault(min(config.buckets - 1, (config.buckets * pos) // n), []).append((i, t))
        for i, t in cells:
            shaped[i, t] = alpha[i, t] * adv_seq[i]
        if config.eta != 0:
            for cells_in_bucket in buckets.values():
                s = [config.beta_p * (old[i, t] - ref[i, t]) for i, t in cells_in_bucket]
                for (i, t), s_norm in zip(cells_in_bucket, _population_normalize(s)):
                    shaped[i, t] = shaped[i, t] + config.eta * gate[i, t] * torch.sign(adv_seq[i]) * s_norm
    return shaped, gate


def _covariance(a, logp, mask):
    valid_a, valid_lp = a[mask], logp.detach()[mask]
    return (a - valid_a.mean()) * (logp.detach() - valid_lp.mean())


def naive_policy_loss(
    logits: Tensor, batch: dict, config: LossConfig, generator: Optional[torch.Generator] = None
) -> LossResult:
    targets, mask = batch["targets"], batch["mask"].bool()
    B, L = mask.shape
    logp, entropy = naive_logprobs_and_entropy(logits, torch.where(mask, targets, 0), config.temperature)
    dtype = logp.dtype
    zero = torch.zeros((), dtype=dtype)
    old = torch.where(mask, batch["old_logp"].to(dtype), zero)
    ref = batch.get("ref_logp")
    ref = None if ref is None else torch.where(mask, ref.to(dtype), zero)
    adv_seq, degenerate = _sequence_advantages(batch, config, dtype)
    a = torch.where(mask, adv_seq[:, None].expand(B, L), zero)
    n_valid = int(mask.sum())
    keep = torch.ones_like(a)
    klcov = torch.zeros_like(a)
    masked = torch.zeros_like(mask)
    extra = {}
    lp = logp.detach()
    ratio_d = torch.exp(lp - old)

    if config.method == "erpo":
        a, gate = _erpo_token_advantages(config, batch, mask, entropy, adv_seq, old, ref)
        cdp = mask & (gate > 0.5)
        extra["cdp_rate"] = cdp.sum() / n_valid
    elif config.method == "high_entropy_mask":
        threshold = torch.quantile(entropy.detach()[mask], 1 - config.rho)
        kept = mask & (entropy.detach() >= threshold)
        a = torch.where(kept, a, zero)
        masked = mask & ~kept
    elif config.method == "clip_cov":
        cov = _covariance(a, logp, mask)
        clipped = -a * ratio_d.clamp(1 - config.eps_low, 1 + config.eps_high) > -a * ratio_d
        flat_cov, flat_mask, flat_clipped = cov.view(-1).tolist(), mask.view(-1).tolist(), clipped.view(-1).tolist()
        candidates = [
            j for j in range(B * L)
            if flat_mask[j] and config.clip_cov_lb < flat_cov[j] < config.clip_cov_ub and not flat_clipped[j]
        ]
        k = min(len(candidates), max(1, math.floor(config.clip_cov_ratio * n_valid)))
        if generator is None:
            generator = torch.Generator(device=logits.device).manual_seed(config.seed)
        keys = torch.rand(B * L, generator=generator, device=logits.device, dtype=torch.float32)
        for j in sorted(candidates, key=lambda j: (float(keys[j]), j))[:k]:
            keep.view(-1)[j] = 0
            masked.view(-1)[j] = True
    elif config.method == "kl_cov":
        cov = _covariance(a, logp, mask).view(-1)
        valid = [j for j in range(B * L) if mask.view(-1)[j]]
        k = max(1, math.floor(config.kl_cov_ratio * n_valid))
        for j in sorted(valid, key=lambda j: (-float(cov[j]), j))[:k]:
            klcov.view(-1)[j] = config.kl_cov_beta
            masked.view(-1)[j] = True
    elif config.method == "repo":
        a = torch.where(mask, a - config.repo_beta * (lp + entropy.detach()), zero)
    elif config.method == "repo_r":
        pos = (a * (1 - config.zeta * lp)).clamp_min(0)
        neg = (a * (1 + config.zeta * lp)).clamp_max(0)
        a = torch.where(a > 0, pos, torch.where(a < 0, neg, zero))

    ratio = torch.exp(logp - old)
    if config.method == "kl_cov":
        per_token = -ratio * a
    else:
        per_token = -torch.minimum(ratio * a, torch.clamp(ratio, 1 - config.eps_low, 1 + config.eps_high) * a)
        if config.dual_clip:
            per_token = torch.where(a < 0, torch.minimum(per_token, -config.dual_clip_c * a), per_token)
    per_token = per_token + klcov * (logp - old).abs()
    if config.kl_coef > 0:
        d = logp - ref
        kl = {"k1": d, "k2": 0.5 * d * d, "k3": torch.exp(-d) + d - 1}[config.kl_estimator]
        per_token = per_token + config.kl_coef * kl
    per_token = (per_token - config.entropy_coef * entropy) * keep
    per_token = torch.where(mask, per_token, zero)

    lengths = mask.sum(1)
    if config.agg == "token-mean":
        loss = per_token.sum() / n_valid
    elif config.agg == "seq-mean-token-mean":
        loss = torch.stack([per_token[i].sum() / lengths[i] for i in range(B) if lengths[i] > 0]).mean()
    elif config.agg == "seq-mean-token-sum":
        loss = per_token.sum(1).mean()
    else:
        loss = per_token.sum() / (B * (config.max_len or L))

    clips = config.method != "kl_cov"  # KL-Cov has no PPO clip
    metrics = {
        "entropy": entropy.detach()[mask].mean(),
        "clip_frac_low": (mask & (a < 0) & (ratio_d < 1 - config.eps_low)).sum() / n_valid if clips else zero,
        "clip_frac_high": (mask & (a > 0) & (ratio_d > 1 + config.eps_high)).sum() / n_valid if clips else zero,
        "ratio_mean": ratio_d[mask].mean(),
        "approx_kl": (torch.exp(old - lp) - (old - lp) - 1)[mask].mean(),
        "masked_frac": masked.sum() / n_valid,
        "n_valid_tokens": torch.tensor(n_valid),
        "degenerate_groups": torch.tensor(degenerate),
        **extra,
    }
    return LossResult(loss=loss, metrics={k: v.detach() for k, v in metrics.items()})
