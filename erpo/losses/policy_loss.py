"""`policy_loss(logits, batch, config)` and `token_policy_loss(logp, entropy, batch, config)`: the public
entries of erpo's policy losses.

One call = the fused op's forward over [N, V] (logp, H) -> [N]-sized method logic on the device (controls,
importance weights, corrections) -> the per-token kernel -> aggregation. `.backward()` then runs the
per-token coefficients into the fused op's backward, the only other pass over V. Metrics are detached 0-d
tensors: nothing syncs with the host except the optional input checks (config.check_inputs, one sync).
"""
import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from erpo.losses import advantages as advantages_lib
from erpo.losses.aggregation import token_weights
from erpo.losses.batch import IGNORE_INDEX, prepare, prepare_tokens
from erpo.losses.config import LossConfig
from erpo.losses.shaping import Tokens, apply_controls
from erpo.losses.importance import token_extras
from erpo.losses.segments import dense_ids
from erpo.losses.token_loss import TokenParams, kl_terms, token_loss
from erpo.ops import backends
from erpo.ops.logprobs_entropy import check_plain_for_support, check_support_args, logprobs_and_entropy
from erpo.ops.support_logprobs_entropy import support_logprobs_and_entropy
from erpo.ops.vocab_parallel import global_vocab


@dataclass
class LossResult:
    loss: Tensor  # 0-d, differentiable w.r.t. the logits
    metrics: dict  # name -> detached 0-d tensor


def token_params(config: LossConfig) -> TokenParams:
    """The per-token kernel's knobs: each TokenParams field is the LossConfig field of the same name."""
    return TokenParams(**{f.name: getattr(config, f.name) for f in dataclasses.fields(TokenParams)})


def seq_advantages(config: LossConfig, flat, metrics: dict, dtype: torch.dtype) -> Tensor:
    if flat.advantages is not None:
        return flat.advantages.to(dtype)
    result = advantages_lib.compute(config.adv_estimator, flat.rewards.to(dtype), flat.group_ids)
    metrics["degenerate_groups"] = result.n_degenerate_groups
    metrics["degenerate_frac"] = result.degenerate.float().mean()
    return result.advantages


def _valid_mean(values: Tensor, valid: Tensor, n_valid: Tensor) -> Tensor:
    return torch.where(valid, values, torch.zeros_like(values)).sum() / n_valid


def _valid_extreme(values: Tensor, valid: Tensor, which: str) -> Tensor:
    """min or max over the valid entries; +inf / -inf (the identity of min / max) when there are none."""
    fill = float("inf") if which == "min" else -float("inf")
    if values.numel() == 0:
        return values.new_full((), fill)
    masked = torch.where(valid, values, torch.full_like(values, fill))
    return masked.amin() if which == "min" else masked.amax()


def policy_loss(logits: Tensor, batch, config: LossConfig, generator: Optional[torch.Generator] = None,
                process_group=None, shift: bool = False, softcap: Optional[float] = None,
                logit_scale: float = 1.0) -> LossResult:
    """The policy loss of `config.method` on one batch; see docs/losses.md for the batch layouts.

    `generator` drives Clip-Cov's random pick; without one a generator seeded with config.seed is used,
    so a call is reproducible (pass your own, e.g. PolicyLoss's, to draw fresh picks each step).
    `process_group`: the logits are this rank's vocabulary slice (see erpo.logprobs_and_entropy); targets are
    global ids, checked against the whole vocabulary.
    `shift=True`: `logits` are a causal LM's unsliced `[B, L+1, V]` (or `[N+1, V]`) output and the batch is that of
    `logits[..., :-1, :]`; the backward then writes one full-size gradient (zero at the dropped position) instead of
    autograd copying a slice's gradient into a fresh buffer (see erpo.logprobs_and_entropy).
    `softcap`, `logit_scale`: for logits taken before the model's final soft-capping / scaling (e.g. a custom
    head's raw output), applied inside the fused op as erpo.logprobs_and_entropy does; a model's own logits have
    them already (leave the defaults). Properties of the model, not of the loss: not LossConfig fields.
    """
    _check_config(config)
    if shift and (not isinstance(logits, Tensor) or logits.dim() < 2):
        raise ValueError("shift=True needs logits [B, L+1, V] or [N+1, V]")
    positions = logits[..., :-1, :] if shift else logits  # a view: the token positions the batch describes
    if process_group is None:
        flat = prepare(positions, batch, config)
    else:
        flat = prepare_tokens(tuple(positions.shape[:-1]), global_vocab(logits.shape[-1], process_group, logits.device),
                              logits.device, torch.float64 if logits.dtype == torch.float64 else torch.float32,
                              batch, config, "logits")
    backend = backends.resolve(config.backend, logits.is_cuda)
    support_ids = batch.get("support_ids") if isinstance(batch, dict) else getattr(batch, "support_ids", None)
    if on_support(config, support_ids, positions.shape[-1]):
        # The stats pass over S runs on the torch backend whatever config.backend (docs/support.md); the per-token
        # loss keeps its backend.
        check_support_args(config.support, support_ids, "torch", config.inplace_grad, process_group)
        check_plain_for_support(logit_scale, softcap)
        stats = support_logprobs_and_entropy(positions, flat.targets, 1.0 / config.temperature, IGNORE_INDEX,
                                             config.support, support_ids, config.check_inputs)
        return loss_on_support(stats, flat, config, backend, generator)
    logp, entropy = logprobs_and_entropy(
        logits, flat.targets, temperature=config.temperature, backend=backend,
        check_targets=False,  # valid targets were range-checked in prepare() (within its one sync); others are ignored
        inplace_grad=config.inplace_grad, process_group=process_group, shift=shift, softcap=softcap,
        logit_scale=logit_scale,
    )
    return loss_from_token_stats(logp, entropy, flat, config, backend, generator)


def on_support(config: LossConfig, support_ids, vocab: int) -> bool:
    """Whether the stats pass runs over the sampler's truncated support (docs/support.md)."""
    return support_ids is not None or (config.support is not None and not config.support.is_full(vocab))


def loss_on_support(stats, flat, config: LossConfig, backend: str, generator) -> LossResult:
    """The loss from the support op's results: the ratio and the KL over S, the entropy terms over
    config.support_entropy's distribution; plus the support's metrics over the valid tokens."""
    entropy = stats.full_entropy if config.support_entropy == "full" else stats.entropy
    result = loss_from_token_stats(stats.logp, entropy, flat, config, backend, generator)
    result.metrics.update(support_metrics(stats, flat.valid))
    return result


def support_metrics(stats, valid: Tensor) -> dict:
    """The support's metrics over the valid tokens: mean |S|, the fraction of singletons, the fraction of sampled
    tokens added to S, and the mean logp over S - logp over the vocabulary (-log of S's mass at the token)."""
    valid = valid.reshape(-1)
    count = valid.sum().clamp_min(1)
    size = stats.size.reshape(-1)
    return {
        "support_size_mean": torch.where(valid, size, 0.0).sum() / count,
        "support_singleton_frac": (valid & (size == 1)).sum() / count,
        "support_target_added": (valid & (stats.target_added.reshape(-1) > 0)).sum() / count,
        "support_mass_logratio": torch.where(valid, (stats.logp - stats.full_logp).detach().reshape(-1), 0.0).sum()
        / count,
    }


def _check_config(config) -> None:
    if not isinstance(config, LossConfig):
        raise TypeError(f"config must be an erpo.LossConfig, got {type(config).__name__}")


def token_policy_loss(logp: Tensor, entropy: Optional[Tensor], batch, config: LossConfig,
                      generator: Optional[torch.Generator] = None) -> LossResult:
    """The same loss as `policy_loss` from per-token log-probs (and entropies) an engine already computed.

    `logp` [B, L] (padded) or [N] (packed) float, differentiable; `entropy` the same shape, or None when the
    config reads no entropy (`config.needs_entropy`); gradients flow into both. The batch is policy_loss's
    without `targets`. Equal to `policy_loss` on the logits that produced logp and entropy, for every config.
    """
    _check_config(config)
    if not isinstance(logp, Tensor) or not logp.dtype.is_floating_point:
        raise TypeError(f"logp must be a float tensor, got {getattr(logp, 'dtype', type(logp).__name__)}")
    if logp.dim() not in (1, 2):
        raise ValueError(f"logp must be [B, L] (padded) or [N] (packed), got shape {tuple(logp.shape)}")
    if entropy is None:
        if config.needs_entropy:
            raise ValueError(f"token_policy_loss got entropy=None but the config reads the entropy "
                             f"({config.entropy_reason()}): pass the per-token entropy")
    elif not isinstance(entropy, Tensor) or entropy.shape != logp.shape or entropy.device != logp.device:
        raise ValueError(f"entropy must be a tensor shaped and placed like logp {tuple(logp.shape)} on {logp.device}, "
                         f"got {getattr(entropy, 'shape', type(entropy).__name__)}")
    compute = torch.float64 if logp.dtype == torch.float64 else torch.float32
    flat = prepare_tokens(tuple(logp.shape), None, logp.device, compute, batch, config, "logp")
    backend = backends.resolve(config.backend, logp.is_cuda)
    logp = logp.to(compute)
    given_entropy = entropy is not None
    entropy = entropy.to(compute) if given_entropy else torch.zeros_like(logp.detach())
    result = loss_from_token_stats(logp, entropy, flat, config, backend, generator)
    if not given_entropy:
        del result.metrics["entropy"]  # never report the zeros that stand in for an entropy nobody gave
    return result


def loss_from_token_stats(logp: Tensor, entropy: Tensor, flat, config: LossConfig, backend: str,
                          generator: Optional[torch.Generator] = None) -> LossResult:
    """The [N]-sized middle of every policy loss: method logic, per-token terms, aggregation, metrics.

    `logp` and `entropy` are the per-token statistics of the stats pass (any shape that flattens to the
    batch's N tokens), differentiable w.r.t. whatever produced them (logits, or hidden states and the head);
    their gradient flows back into that producer's gradient pass.
    """
    logp, entropy = logp.reshape(-1), entropy.reshape(-1)
    dtype = logp.dtype
    metrics: dict = {}
    seq_adv = seq_advantages(config, flat, metrics, dtype)
    tokens = Tokens(
        seq=flat.seq, valid=flat.valid, n_seqs=flat.n_seqs, logp=logp.detach(), entropy=entropy.detach(),
        old=flat.old, ref=flat.ref, seq_adv=seq_adv,
        group=None if flat.group_ids is None else dense_ids(flat.group_ids.to(flat.seq.device)),
    )
    if "clip_cov" in config.controls and generator is None:
        generator = torch.Generator(device=logp.device).manual_seed(config.seed)
    shaping = apply_controls(config, tokens, generator)
    extras, importance_metrics = token_extras(config, tokens, flat.rollout, shaping)

    ref_for_kl = flat.ref if config.kl_coef > 0 else None
    params = token_params(config)
    # The entropy bonus is a term of its own (below), so the per-token kernel runs without it.
    per_token, clip_low, clip_high = token_loss(
        logp, entropy, flat.old, shaping.adv.contiguous(), ref_for_kl, shaping.klcov_w,
        dataclasses.replace(params, entropy_coef=0.0), backend, extras,
    )
    max_len = config.max_len if config.max_len is not None else flat.padded_len
    weights = token_weights(config.agg, flat.valid, flat.seq, flat.n_seqs, max_len or 1, dtype, flat.num_items,
                            flat.num_seqs)
    if shaping.keep is not None:
        weights = weights * shaping.keep
    n_valid = flat.valid.sum()
    denominator = n_valid.clamp_min(1)  # metrics of a batch without valid tokens: 0, not 0 / 0
    # Invalid tokens carry weight 0 and finite terms; a NaN on a valid token propagates into the loss. A batch
    # without a valid token gives a differentiable 0 (every weight is 0) and counts in n_empty_batches.
    loss = (per_token * weights).sum()
    if config.entropy_coef != 0:
        # The bonus is entropy_coef x the mean entropy per valid token of the optimizer step (token-mean over
        # num_items_in_batch when given), whatever the policy term's aggregation: one meaning of entropy_coef for
        # every preset (docs/losses.md, "Entropy bonus"). Clip-Cov's zeroed tokens lose it with the rest of their term.
        bonus_weights = token_weights("token-mean", flat.valid, flat.seq, flat.n_seqs, 1, dtype, flat.num_items)
        if shaping.keep is not None:
            bonus_weights = bonus_weights * shaping.keep
        bonus = torch.where(flat.valid, entropy * bonus_weights, torch.zeros((), dtype=dtype, device=logp.device)).sum()
        loss = loss - config.entropy_coef * bonus
        metrics["entropy_bonus"] = bonus.detach()

    with torch.no_grad():
        valid = flat.valid
        ratio = torch.exp(tokens.logp - flat.old)
        log_back = flat.old - tokens.logp
        zero = torch.zeros((), device=logp.device)
        metrics.update({
            "entropy": _valid_mean(tokens.entropy, valid, denominator),
            "clip_frac_low": (clip_low & valid).sum() / denominator,
            "clip_frac_high": (clip_high & valid).sum() / denominator,
            "ratio_mean": _valid_mean(ratio, valid, denominator),
            "ratio_min": _valid_extreme(ratio, valid, "min"),
            "ratio_max": _valid_extreme(ratio, valid, "max"),
            "approx_kl": _valid_mean(torch.exp(log_back) - log_back - 1, valid, denominator),
            "masked_frac": (
                (shaping.masked & valid).sum() / denominator if shaping.masked is not None else zero
            ),
            "n_valid_tokens": n_valid,
            "n_empty_batches": (n_valid == 0).long(),
            "adv_token_mean": _valid_mean(shaping.adv, valid, denominator),
            "nonfinite_tokens": (valid & ~torch.isfinite(per_token.detach())).sum(),
        })
        if ref_for_kl is not None:
            kl, _ = kl_terms(tokens.logp - flat.ref, config.kl_estimator)
            metrics["kl_ref"] = _valid_mean(kl, valid, denominator)
        metrics.update(shaping.metrics)
        metrics.update(importance_metrics)
    return LossResult(loss=loss, metrics={k: v.detach() for k, v in metrics.items()})
