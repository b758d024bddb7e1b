"""The entropy-aware controls over [N] tokens: each reshapes the token advantage, drops tokens' terms, or
selects tokens for a penalty or a per-token clip range, and any number of them compose on any objective.

`apply_controls` runs the config's controls in one fixed order, whatever order the config lists them in:
advantage shapings first (ERPO's gate, entropy advantage, REPO / REPO-R), then selections that read the
shaped advantage (80/20 mask, Archer's dual-token split, Clip-Cov, KL-Cov). ADAPO has nothing here: its
controller moves eps_high between steps (controllers.py).

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
        """The valid-token count as a divisor: at least 1, so a batch without valid tokens gives 0 fractions."""
        return self.valid.sum().clamp_min(1)

    def seq_lengths(self) -> Tensor:
        return segment_sum(self.valid.to(self.logp.dtype), self.seq, self.n_seqs)


@dataclass
class Shaping:
    adv: Tensor  # [N] token advantage, 0 on invalid tokens
    keep: Optional[Tensor] = None  # [N] 0/1 multiplier of the whole token term (Clip-Cov)
    klcov_w: Optional[Tensor] = None  # [N] KL-Cov beta on the selected tokens, 0 elsewhere
    masked: Optional[Tensor] = None  # [N] bool: tokens masked or selected by the method
    eps_low: Optional[Tensor] = None  # [N] per-token clip range (Archer)
    eps_high: Optional[Tensor] = None
    kl_weight: Optional[Tensor] = None  # [N] per-token multiplier of kl_coef (Archer)
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
    # gather with a [1] index, not ordered[low]: indexing with a 0-d tensor reads it back to the host (a sync)
    at_low, at_high = ordered.gather(0, low.view(1)), ordered.gather(0, high.view(1))
    return (at_low + frac * (at_high - at_low)).reshape(())


def high_entropy_mask(config: LossConfig, tokens: Tokens, base: Tensor) -> Shaping:
    """80/20: keep the PG term only where H >= quantile_{1 - rho}(H over valid tokens)."""
    threshold = entropy_quantile(tokens.entropy, tokens.valid, 1.0 - config.rho)
    kept = tokens.valid & (tokens.entropy >= threshold)
    dropped = tokens.valid & ~kept
    return Shaping(
        adv=torch.where(kept, base, torch.zeros_like(base)),
        masked=dropped,
        metrics={"entropy_threshold": torch.where(tokens.valid.any(), threshold, torch.zeros_like(threshold)),
                 "entropy_mask_frac": dropped.sum() / tokens.n_valid},
    )


def segment_quantile(values: Tensor, segment: Tensor, valid: Tensor, n_segments: int, q: float) -> Tensor:
    """[n_segments] linear-interpolation quantile q of `values` over each segment's valid entries (torch.quantile's
    rule per segment; an empty segment gives +inf), sorted on the device, no sync."""
    keys = torch.where(valid, values, torch.full_like(values, float("inf")))
    by_value = torch.sort(keys, stable=True).indices
    order = by_value[torch.sort(segment[by_value], stable=True).indices]  # by segment, then by value
    ordered = keys[order]
    sizes = segment_sum(torch.ones_like(values), segment, n_segments).long()
    start = torch.cumsum(sizes, 0) - sizes
    counts = segment_sum(valid.to(values.dtype), segment, n_segments)
    position = q * (counts - 1).clamp_min(0)
    low, high = position.floor().long(), position.ceil().long()
    last = values.numel() - 1
    at_low = ordered[(start + low).clamp(0, max(last, 0))]
    at_high = ordered[(start + high).clamp(0, max(last, 0))]
    quantile = at_low + (position - low.to(values.dtype)) * (at_high - at_low)
    return torch.where(counts > 0, quantile, torch.full_like(quantile, float("inf")))


def archer(config: LossConfig, tokens: Tokens, base: Tensor) -> Shaping:
    """Archer (Wang et al. 2025, dual-token constraints): in each response the tokens with H >= its
    (1 - archer_rho) entropy quantile get the wider clip archer_eps on both sides and no KL; the others keep
    [eps_low, eps_high] and the KL term."""
    threshold = segment_quantile(tokens.entropy, tokens.seq, tokens.valid, tokens.n_seqs, 1.0 - config.archer_rho)
    high = tokens.valid & (tokens.entropy >= threshold[tokens.seq])
    ones = torch.ones_like(base)
    return Shaping(
        adv=base,
        eps_low=torch.where(high, config.archer_eps * ones, config.eps_low * ones),
        eps_high=torch.where(high, config.archer_eps * ones, config.eps_high * ones),
        kl_weight=(~high).to(base.dtype),
        metrics={"archer_high_frac": high.sum() / tokens.n_valid},
    )


def entropy_advantage(config: LossConfig, tokens: Tokens, base: Tensor) -> Shaping:
    """Cheng et al. 2025 ("Reasoning with Exploration: An Entropy Perspective"): a' = a + min(alpha sg(H), |a| / kappa);
    the bonus never flips the sign of a (kappa > 1) and is 0 where a = 0."""
    bonus = torch.minimum(config.entropy_adv_alpha * tokens.entropy, base.abs() / config.entropy_adv_kappa)
    bonus = torch.where(tokens.valid, bonus, torch.zeros_like(base))
    return Shaping(adv=base + bonus, metrics={"entropy_adv_bonus": _valid_mean(bonus, tokens)})


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


def clip_cov(config: LossConfig, tokens: Tokens, base: Tensor, generator: torch.Generator,
             eps_low=None, eps_high=None) -> Shaping:
    """Clip-Cov: zero the whole loss term of min(#cand, max(1, floor(r N_valid))) random candidates.
    `eps_low`/`eps_high`: per-token clip ranges when another control set them (Archer)."""
    cov = _covariance(tokens, base)
    ratio = torch.exp(tokens.logp - tokens.old)
    low = 1 - (config.eps_low if eps_low is None else eps_low)
    high = 1 + (config.eps_high if eps_high is None else eps_high)
    clip_active = -base * torch.minimum(torch.maximum(ratio, torch.as_tensor(low, dtype=ratio.dtype)),
                                        torch.as_tensor(high, dtype=ratio.dtype)) > -base * ratio
    candidate = tokens.valid & (cov > config.clip_cov_lb) & (cov < config.clip_cov_ub) & ~clip_active
    budget = torch.minimum(candidate.sum(), _budget(config.clip_cov_ratio, tokens.n_valid))
    keys = torch.rand(base.numel(), generator=generator, device=base.device, dtype=torch.float32)
    keys = torch.where(candidate, keys, torch.full_like(keys, float("inf")))
    picked = candidate & (_rank(keys, descending=False) < budget)
    return Shaping(
        adv=base,
        keep=(~picked).to(base.dtype),
        masked=picked,
        metrics={"cov_candidates": candidate.sum(), "clip_cov_frac": picked.sum() / tokens.n_valid},
    )


def kl_cov(config: LossConfig, tokens: Tokens, base: Tensor) -> Shaping:
    """KL-Cov: + beta |logp - old| on the top max(1, floor(k N_valid)) valid tokens by covariance."""
    cov = _covariance(tokens, base)
    keys = torch.where(tokens.valid, cov, torch.full_like(cov, -float("inf")))
    picked = tokens.valid & (_rank(keys, descending=True) < _budget(config.kl_cov_ratio, tokens.n_valid))
    return Shaping(adv=base, klcov_w=picked.to(base.dtype) * config.kl_cov_beta, masked=picked,
                   metrics={"kl_cov_frac": picked.sum() / tokens.n_valid})


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


# The order controls run in (advantage shapings, then the selections that read the shaped advantage).
ORDER = ("erpo", "entropy_advantage", "repo", "repo_r", "high_entropy_mask", "archer", "clip_cov", "kl_cov", "adapo")
ADVANTAGE_SHAPINGS = {"erpo": erpo_advantage, "entropy_advantage": entropy_advantage, "repo": repo, "repo_r": repo_r}


def _union(a: Optional[Tensor], b: Optional[Tensor]) -> Optional[Tensor]:
    return b if a is None else a if b is None else a | b


def apply_controls(config: LossConfig, tokens: Tokens, generator: Optional[torch.Generator]) -> Shaping:
    """The token advantage and selections of `config.controls`, composed in ORDER."""
    adv = torch.where(tokens.valid, tokens.seq_adv[tokens.seq], torch.zeros_like(tokens.logp))
    result = Shaping(adv=adv)
    for name in sorted(config.controls, key=ORDER.index):
        if name in ADVANTAGE_SHAPINGS:
            step = ADVANTAGE_SHAPINGS[name](config, tokens, result.adv)
        elif name == "high_entropy_mask":
            step = high_entropy_mask(config, tokens, result.adv)
        elif name == "archer":
            step = archer(config, tokens, result.adv)
            result.eps_low, result.eps_high, result.kl_weight = step.eps_low, step.eps_high, step.kl_weight
        elif name == "clip_cov":
            step = clip_cov(config, tokens, result.adv, generator, result.eps_low, result.eps_high)
            result.keep = step.keep
        elif name == "kl_cov":
            step = kl_cov(config, tokens, result.adv)
            result.klcov_w = step.klcov_w
        else:  # adapo: a controller between steps, nothing per token
            continue
        result.adv = step.adv
        result.masked = _union(result.masked, step.masked)
        result.metrics.update(step.metrics)
    return result
