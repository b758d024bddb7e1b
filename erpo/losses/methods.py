"""Method logic over [N] tokens: the token advantage of each method, and the Clip-Cov / KL-Cov selections.

Inputs are detached (the spec's sg()): the advantage never carries gradient; only the per-token loss
(token_loss.py) differentiates through logp and, for the entropy bonus, H. Shapes depend only on the batch
shape, never on its values, and nothing here reads a value back to the host.
"""
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from erpo.losses.config import LossConfig
from erpo.losses.segments import positions_in_segment, segment_mean_std, segment_sum

STD_EPS = 1e-6


@dataclass
class Tokens:
    """The flat view of one batch: N tokens belonging to S responses, responses to groups."""

    seq: Tensor  # [N] long, response index in [0, S); responses are contiguous in flat order
    valid: Tensor  # [N] bool
    n_seqs: int  # S
    logp: Tensor  # [N] detached
    entropy: Tensor  # [N] detached
    old: Tensor  # [N], 0 on invalid tokens
    ref: Optional[Tensor]  # [N] or None, 0 on invalid tokens
    seq_adv: Tensor  # [S]
    group: Optional[Tensor]  # [S] dense group index in [0, S), or None

    @property
    def n_valid(self) -> Tensor:
        return self.valid.sum()

    def seq_lengths(self) -> Tensor:
        return segment_sum(self.valid.to(self.logp.dtype), self.seq, self.n_seqs)


@dataclass
class Shaping:
    adv: Tensor  # [N] token advantage, 0 on invalid tokens
    keep: Optional[Tensor] = None  # [N] 0/1 multiplier of the whole token term (Clip-Cov)
    klcov_w: Optional[Tensor] = None  # [N] KL-Cov beta on the selected tokens, 0 elsewhere
    masked: Optional[Tensor] = None  # [N] bool: tokens masked or selected by the method
    metrics: dict = field(default_factory=dict)


def _valid_mean(values: Tensor, tokens: Tokens) -> Tensor:
    return torch.where(tokens.valid, values, torch.zeros_like(values)).sum() / tokens.n_valid


def _segment_logsumexp(values: Tensor, segment: Tensor, valid: Tensor, n_segments: int) -> Tensor:
    neg_inf = torch.full_like(values, -float("inf"))
    values = torch.where(valid, values, neg_inf)
    peak = neg_inf.new_full((n_segments,), -float("inf")).scatter_reduce(0, segment, values, reduce="amax")
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    total = segment_sum(torch.exp(values - peak[segment]), segment, n_segments)
    return peak + torch.log(total)


def erpo_advantage(config: LossConfig, tokens: Tokens, base: Tensor) -> Shaping:
    """Spec section 3: entropy gate (i), progress buckets (ii), anchored synthesis (iii)."""
    valid, seq, n_seqs = tokens.valid, tokens.seq, tokens.n_seqs
    zeros = torch.zeros_like(base)
    group = tokens.group[seq]
    mean, std, _ = segment_mean_std(tokens.entropy, group, valid, n_seqs)
    z = (tokens.entropy - mean[group]) / (std[group] + STD_EPS)
    gate = torch.where(valid, torch.sigmoid(config.gamma * z), zeros)
    lengths = tokens.seq_lengths()
    if config.gate == "redistribute":
        # alpha = L_i w / sum_t m w, in log space so a response whose gates all underflow still sums to L_i.
        log_gate = F.logsigmoid(config.gamma * z)
        log_norm = _segment_logsumexp(log_gate, seq, valid, n_seqs)
        alpha = lengths[seq] * torch.exp(log_gate - log_norm[seq])
    elif config.gate == "amplify":
        alpha = 1.0 + config.gate_lambda * gate
    else:
        alpha = torch.ones_like(base)
    adv = torch.where(valid, alpha * base, zeros)
    if config.eta != 0:
        progress = config.beta_p * (tokens.old - tokens.ref)
        position = positions_in_segment(valid, seq, n_seqs)
        k = config.buckets
        bucket = torch.clamp(torch.div(k * position, lengths[seq].long().clamp_min(1), rounding_mode="floor"), 0, k - 1)
        slot = group * k + bucket
        b_mean, b_std, _ = segment_mean_std(progress, slot, valid, n_seqs * k)
        normalized = (progress - b_mean[slot]) / (b_std[slot] + STD_EPS)
        anchored = gate * torch.sign(base) * normalized
        adv = adv + config.eta * torch.where(valid, anchored, zeros)
    cdp = valid & (gate > 0.5)
    n_cdp = cdp.sum()
    metrics = {
        "cdp_rate": n_cdp / tokens.n_valid,
        "entropy_cdp": torch.where(cdp, tokens.entropy, zeros).sum() / n_cdp.clamp_min(1),
        "gate_mean": _valid_mean(gate, tokens),
    }
    return Shaping(adv=adv, metrics=metrics)


def entropy_quantile(entropy: Tensor, valid: Tensor, q: float) -> Tensor:
    """Linear-interpolation quantile q of entropy over the valid tokens (torch.quantile's rule), 0-d, no sync."""
    keys = torch.where(valid, entropy, torch.full_like(entropy, float("inf")))
    ordered = torch.sort(keys).values
    position = q * (valid.sum().to(entropy.dtype) - 1)
    low = position.floor().long().clamp(0, entropy.numel() - 1)
    high = position.ceil().long().clamp(0, entropy.numel() - 1)
    frac = position - low.to(entropy.dtype)
    return ordered[low] + frac * (ordered[high] - ordered[low])


def high_entropy_mask(config: LossConfig, tokens: Tokens, base: Tensor) -> Shaping:
    """80/20: keep the PG term only where H >= quantile_{1 - rho}(H over valid tokens)."""
    threshold = entropy_quantile(tokens.entropy, tokens.valid, 1.0 - config.rho)
    kept = tokens.valid & (tokens.entropy >= threshold)
    return Shaping(
        adv=torch.where(kept, base, torch.zeros_like(base)),
        masked=tokens.valid & ~kept,
        metrics={"entropy_threshold": threshold},
    )


def _covariance(tokens: Tokens, base: Tensor) -> Tensor:
    centered_adv = base - _valid_mean(base, tokens)
    centered_logp = tokens.logp - _valid_mean(tokens.logp, tokens)
    return centered_adv * centered_logp


def _rank(keys: Tensor, descending: bool) -> Tensor:
    """Rank of each entry in a stable sort of keys (equal keys: lower flat index first)."""
    order = torch.sort(keys, descending=descending, stable=True).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device)
    return rank


def _budget(fraction: float, n_valid: Tensor) -> Tensor:
    """max(1, floor(fraction * N_valid)) as a 0-d tensor (float64 so it matches Python's floor)."""
    return torch.floor(fraction * n_valid.to(torch.float64)).long().clamp_min(1)


def clip_cov(config: LossConfig, tokens: Tokens, base: Tensor, generator: torch.Generator) -> Shaping:
    """Clip-Cov: zero the whole loss term of min(#cand, max(1, floor(r N_valid))) random candidates."""
    cov = _covariance(tokens, base)
    ratio = torch.exp(tokens.logp - tokens.old)
    clip_active = -base * ratio.clamp(1 - config.eps_low, 1 + config.eps_high) > -base * ratio
    candidate = tokens.valid & (cov > config.clip_cov_lb) & (cov < config.clip_cov_ub) & ~clip_active
    budget = torch.minimum(candidate.sum(), _budget(config.clip_cov_ratio, tokens.n_valid))
    keys = torch.rand(base.numel(), generator=generator, device=base.device, dtype=torch.float32)
    keys = torch.where(candidate, keys, torch.full_like(keys, float("inf")))
    picked = candidate & (_rank(keys, descending=False) < budget)
    return Shaping(
        adv=base,
        keep=(~picked).to(base.dtype),
        masked=picked,
        metrics={"cov_candidates": candidate.sum()},
    )


def kl_cov(config: LossConfig, tokens: Tokens, base: Tensor) -> Shaping:
    """KL-Cov: + beta |logp - old| on the top max(1, floor(k N_valid)) valid tokens by covariance."""
    cov = _covariance(tokens, base)
    keys = torch.where(tokens.valid, cov, torch.full_like(cov, -float("inf")))
    picked = tokens.valid & (_rank(keys, descending=True) < _budget(config.kl_cov_ratio, tokens.n_valid))
    return Shaping(adv=base, klcov_w=picked.to(base.dtype) * config.kl_cov_beta, masked=picked)


def repo(config: LossConfig, tokens: Tokens, base: Tensor) -> Shaping:
    """REPO: a' = a - beta sg(logp + H)."""
    shifted = base - config.repo_beta * (tokens.logp + tokens.entropy)
    return Shaping(adv=torch.where(tokens.valid, shifted, torch.zeros_like(base)))


def repo_r(config: LossConfig, tokens: Tokens, base: Tensor) -> Shaping:
    """REPO-R: a (1 - zeta sg(logp)) clamped >= 0 for a > 0; a (1 + zeta sg(logp)) clamped <= 0 for a < 0."""
    zeta = config.zeta
    positive = (base * (1 - zeta * tokens.logp)).clamp_min(0)
    negative = (base * (1 + zeta * tokens.logp)).clamp_max(0)
    adv = torch.where(base > 0, positive, torch.where(base < 0, negative, torch.zeros_like(base)))
    return Shaping(adv=torch.where(tokens.valid, adv, torch.zeros_like(base)))


def token_advantages(config: LossConfig, tokens: Tokens, generator: Optional[torch.Generator]) -> Shaping:
    base = torch.where(tokens.valid, tokens.seq_adv[tokens.seq], torch.zeros_like(tokens.logp))
    method = config.method
    if method == "erpo":
        return erpo_advantage(config, tokens, base)
    if method == "high_entropy_mask":
        return high_entropy_mask(config, tokens, base)
    if method == "clip_cov":
        return clip_cov(config, tokens, base, generator)
    if method == "kl_cov":
        return kl_cov(config, tokens, base)
    if method == "repo":
        return repo(config, tokens, base)
    if method == "repo_r":
        return repo_r(config, tokens, base)
    return Shaping(adv=base)  # grpo, dapo, dr_grpo, adapo: the plain surrogate
