"""`apply_controls`: the config's controls (erpo/losses/controls/) over the [N] tokens, in their declared order.

Inputs are detached (the spec's sg()): the advantage never carries gradient; only the per-token loss
(token_loss.py) differentiates through logp and, for the entropy bonus, H. Shapes depend only on the batch
shape, never on its values, and nothing here reads a value back to the host.
"""
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from erpo.losses import controls as registry
from erpo.losses.config import LossConfig
from erpo.losses.segments import segment_sum

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


def valid_mean(values: Tensor, tokens: Tokens) -> Tensor:
    return torch.where(tokens.valid, values, torch.zeros_like(values)).sum() / tokens.n_valid


def covariance(tokens: Tokens, base: Tensor) -> Tensor:
    """(a - mean a)(logp - mean logp) per token, means over the valid tokens (Clip-Cov, KL-Cov)."""
    return (base - valid_mean(base, tokens)) * (tokens.logp - valid_mean(tokens.logp, tokens))


def rank(keys: Tensor, descending: bool) -> Tensor:
    """Rank of each entry in a stable sort of keys (equal keys: lower flat index first)."""
    order = torch.sort(keys, descending=descending, stable=True).indices
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(order.numel(), device=order.device)
    return ranks


def budget(fraction: float, n_valid: Tensor) -> Tensor:
    """max(1, floor(fraction * N_valid)) as a 0-d tensor (float64 so it matches Python's floor)."""
    return torch.floor(fraction * n_valid.to(torch.float64)).long().clamp_min(1)


def apply_controls(config: LossConfig, tokens: Tokens, generator: Optional[torch.Generator]) -> Shaping:
    """The token advantage and selections of `config.controls`, composed in their declared order: each step sees
    the shaping so far; what it returns replaces the advantage and the fields it sets, its masked tokens add up."""
    adv = torch.where(tokens.valid, tokens.seq_adv[tokens.seq], torch.zeros_like(tokens.logp))
    result = Shaping(adv=adv)
    for control in registry.ordered(config.controls):
        if control.apply is None:
            continue
        step = control.apply(config, tokens, result, generator)
        for name in ("adv", "keep", "klcov_w", "eps_low", "eps_high", "kl_weight"):
            if getattr(step, name) is not None:
                setattr(result, name, getattr(step, name))
        if step.masked is not None:
            result.masked = step.masked if result.masked is None else result.masked | step.masked
        result.metrics.update(step.metrics)
    return result

