"""`linear_policy_loss(hidden, weight, batch, config)`: every policy loss from the hidden states and the LM
head, with the same loss, metrics and gradients as `policy_loss(hidden @ weight.T + bias, batch, config)`
and without the [N, V] logits.

Two schedules, both ending in the same [N]-sized middle (`loss_from_token_stats`):
- "two_pass" (every method): the fused head's stats pass gives logp and entropy -> method logic over [N]
  (batch-wide statistics included: KL-Cov/Clip-Cov covariances, the 80/20 quantile, ERPO's norms) -> the
  gradient pass recomputes the head (4 matmuls: 1 forward, 1 recompute, 2 gradient).
- "one_pass" (row-local methods only): when each token's loss coefficient depends only on that token's own
  logp and entropy and on per-sequence constants (advantages, aggregation weights from the mask), the
  coefficient is known as soon as a chunk's row statistics are, so the gradient is computed in the forward,
  as Liger does (3 matmuls). The per-token formulas are the loss's own (token_terms, token_weights); the
  loss value and metrics still come from loss_from_token_stats on the same statistics.
"auto" picks one_pass where `one_pass_exact(config)` holds, gradients are needed and the head backend has a
fused forward-backward (the torch backend); two_pass otherwise. The one-pass head gets the coefficients as a
plain function of a chunk's (row ids, logp, entropy) (erpo/ops imports nothing from erpo/losses).
"""
import dataclasses
from typing import Optional

import torch
from torch import Tensor

from erpo.losses.aggregation import token_weights
from erpo.losses import controls as registry
from erpo.losses.batch import IGNORE_INDEX, prepare_tokens
from erpo.losses.config import LossConfig
from erpo.losses.policy_loss import (
    LossResult, loss_from_token_stats, loss_on_support, on_support, seq_advantages, token_params,
)
from erpo.losses.token_loss import TokenParams, token_terms
from erpo.ops import backends
from erpo.ops import linear_logprobs_entropy as head
from erpo.ops.logprobs_entropy import check_plain_for_support, check_support_args
from erpo.ops.support_logprobs_entropy import support_linear_logprobs_and_entropy
from erpo.ops.row_layout import row_layout
from erpo.ops.vocab_parallel import global_vocab

SCHEDULES = ("auto", "one_pass", "two_pass")
# The LossConfig fields the one-pass formulas were written against: the per-token kernel's knobs (TokenParams),
# every control's knobs (a control the config does not enable reads none of its own) and the aggregation's. Any
# other field (the composition itself, or one added later) must keep its preset's value for one_pass.
ONE_PASS_FIELDS = frozenset(
    {f.name for f in dataclasses.fields(TokenParams)} - {"objective"}
    | {"method", "adv_estimator", "agg", "max_len", "temperature", "backend", "check_inputs", "inplace_grad"}
    | {knob for control in registry.ordered() for knob in control.knobs}
)
ONE_PASS_BATCH_KEYS = ("targets", "mask", "old_logp", "ref_logp", "advantages", "rewards", "group_ids", "seq_ids",
                       "num_items_in_batch", "num_seqs_in_batch")


def one_pass_exact(config: LossConfig, batch=None) -> bool:
    """Whether the one-pass schedule gives exactly the two-pass loss: every token's coefficient depends only
    on its own logp/entropy and per-sequence constants (`LossConfig.row_local`: GRPO, DAPO, Dr. GRPO, ADAPO,
    CISPO, SAPO, GPG, with or without the entropy bonus and the KL term)."""
    if not config.row_local:
        return False
    preset = type(config)(method=config.method)
    for field in dataclasses.fields(config):
        if field.name not in ONE_PASS_FIELDS and getattr(config, field.name) != getattr(preset, field.name):
            return False
    if isinstance(batch, dict) and any(v is not None and k not in ONE_PASS_BATCH_KEYS for k, v in batch.items()):
        return False  # a batch input the one-pass formulas do not know about (e.g. rollout log-probs)
    return True


def _head_backend(config: LossConfig, head_backend: Optional[str]) -> str:
    if head_backend is not None:
        return head.resolve_backend(head_backend)
    if config.backend == "cuda":
        raise ValueError("config.backend='cuda' has no fused-head kernel; pass head_backend='torch' or 'triton' "
                         "(the per-token kernel keeps config.backend)")
    return head.resolve_backend(config.backend)


def linear_policy_loss(
    hidden: Tensor,
    weight: Tensor,
    batch,
    config: LossConfig,
    bias: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    schedule: str = "auto",
    head_backend: Optional[str] = None,
    process_group=None,
    softcap: Optional[float] = None,
    logit_scale: float = 1.0,
    head_fp32: bool = False,
) -> LossResult:
    """The policy loss of `config.method` from hidden states `[B, L, H]` (padded) or `[N, H]` (packed) and the
    head `weight [V, H]` (+ `bias [V]`); the batch is policy_loss's, with token positions hidden.shape[:-1].

    `schedule`: "auto", "one_pass" (row-local methods only; raises otherwise) or "two_pass".
    `head_backend`: the fused head's backend ("auto" = "torch", "torch", "triton"); default from config.backend.
    `process_group`: weight/bias are this rank's vocabulary slice (see erpo.linear_logprobs_and_entropy); the
    two-pass schedule runs (the one-pass one needs the whole row's statistics inside a chunk).
    `softcap`, `logit_scale`, `head_fp32`: the model's head, as erpo.linear_logprobs_and_entropy takes them (its
    final logit soft-capping and logit scale, read from its config: e.g. Gemma 2/3's `final_logit_softcapping`;
    a float32 head over 16-bit inputs); both schedules. Properties of the model, not of the loss: keyword
    arguments next to `bias`, not LossConfig fields (one config serves every model).
    """
    if not isinstance(config, LossConfig):
        raise TypeError(f"config must be an erpo.LossConfig, got {type(config).__name__}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if not isinstance(hidden, Tensor):
        raise TypeError(f"hidden must be a tensor, got {type(hidden).__name__}")
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be [B, L, H] (padded) or [N, H] (packed), got shape {tuple(hidden.shape)}")
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D [V, H] tensor, got {getattr(weight, 'shape', type(weight).__name__)}")
    if weight.shape[1] != hidden.shape[-1]:  # before the targets are read against weight.shape[0] as V
        transposed = " (is it transposed? pass the [V, H] weight, e.g. lm_head.weight)" if (
            weight.shape[0] == hidden.shape[-1]) else ""
        raise ValueError(f"hidden's last dim must be the head's H = {weight.shape[1]} (weight {tuple(weight.shape)}), "
                         f"got hidden of shape {tuple(hidden.shape)}{transposed}")
    resolved_head = _head_backend(config, head_backend)
    vocab = weight.shape[0] if process_group is None else global_vocab(weight.shape[0], process_group, hidden.device)
    flat = prepare_tokens(tuple(hidden.shape[:-1]), vocab, hidden.device, torch.float32, batch, config,
                          "hidden")
    head.validate(hidden, weight, flat.targets, bias, config.temperature, resolved_head, logit_scale, softcap,
                  head_fp32)
    model_head = dict(softcap=softcap, logit_scale=logit_scale, head_fp32=head_fp32)
    token_backend = backends.resolve(config.backend, hidden.is_cuda)
    support_ids = batch.get("support_ids") if isinstance(batch, dict) else getattr(batch, "support_ids", None)
    if on_support(config, support_ids, vocab):
        if schedule == "one_pass":
            raise ValueError("schedule='one_pass' does not take a truncated support yet; use 'auto' or 'two_pass'")
        check_support_args(config.support, support_ids, "torch", False, process_group)
        check_plain_for_support(logit_scale, softcap, head_fp32)
        stats = support_linear_logprobs_and_entropy(hidden, weight.contiguous(), bias, flat.targets,
                                                    1.0 / config.temperature, IGNORE_INDEX, config.support,
                                                    support_ids, config.check_inputs)
        return loss_on_support(stats, flat, config, token_backend, generator)
    exact = one_pass_exact(config, batch)
    if schedule == "one_pass" and not exact:
        raise ValueError(f"schedule='one_pass' is exact only for row-local losses (LossConfig.row_local: a row-local "
                         f"objective, no batch-wide control); method {config.method!r} with this config needs 'two_pass'")
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    fused = hasattr(head.load(resolved_head), "forward_backward")
    if schedule == "one_pass" and process_group is not None:
        raise ValueError("schedule='one_pass' cannot run on a vocabulary-sharded head (process_group=): a chunk's "
                         "loss coefficients need the whole row's statistics; use schedule='two_pass' or 'auto'")
    if schedule == "one_pass" and not fused:
        raise ValueError(f"schedule='one_pass' needs a head backend with a fused forward-backward (torch), "
                         f"got {resolved_head!r}")
    if schedule == "one_pass" or (schedule == "auto" and exact and needs_grad and fused and process_group is None):
        return _one_pass(hidden, weight, bias, flat, config, resolved_head, token_backend, generator, model_head)
    logp, entropy = head.linear_logprobs_and_entropy(
        hidden, weight, flat.targets, bias, temperature=config.temperature, backend=resolved_head,
        check_targets=False,  # valid targets were range-checked by prepare_tokens (within its one sync)
        process_group=process_group, **model_head,
    )
    return loss_from_token_stats(logp, entropy, flat, config, token_backend, generator)


def _one_pass(hidden, weight, bias, flat, config, resolved_head, token_backend, generator, model_head) -> LossResult:
    valid = flat.valid
    seq_adv = seq_advantages(config, flat, {}, torch.float32)
    adv = torch.where(valid, seq_adv[flat.seq], torch.zeros((), dtype=torch.float32, device=valid.device))
    max_len = config.max_len if config.max_len is not None else flat.padded_len
    weights = token_weights(config.agg, valid, flat.seq, flat.n_seqs, max_len or 1, torch.float32, flat.num_items,
                            flat.num_seqs)
    # The entropy bonus's own weights: a token mean whatever the aggregation (loss_from_token_stats)
    bonus_weights = token_weights("token-mean", valid, flat.seq, flat.n_seqs, 1, torch.float32, flat.num_items)
    ref = flat.ref if config.kl_coef > 0 else None
    # Detached: the gradient reaches hidden/weight/bias through _PrecomputedGradient, not through the op.
    logp, entropy, grad_hidden, grad_weight, grad_bias = _one_pass_op(
        hidden.detach(), weight.detach().contiguous(), None if bias is None else bias.detach(), flat.targets, flat.old,
        adv.contiguous(), ref, weights.contiguous(), bonus_weights.contiguous(), 1.0 / config.temperature, IGNORE_INDEX,
        token_backend, resolved_head, *dataclasses.astuple(token_params(config)),
        float(model_head["logit_scale"]), None if model_head["softcap"] is None else float(model_head["softcap"]),
        model_head["head_fp32"],
    )
    result = loss_from_token_stats(logp, entropy, flat, config, token_backend, generator)
    attached = _PrecomputedGradient.apply(hidden, weight, bias, grad_hidden, grad_weight, grad_bias)
    return LossResult(loss=result.loss + attached, metrics=result.metrics)


@torch.library.custom_op("erpo::linear_policy_loss_one_pass", mutates_args=())
def _one_pass_op(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, old: Tensor, adv: Tensor,
    ref: Optional[Tensor], weights: Tensor, bonus_weights: Tensor, inv_temperature: float, ignore_index: int,
    token_backend: str, head_backend: str,
    # the TokenParams fields, in order (typed scalars: a custom op takes no dataclass)
    eps_low: float, eps_high: float, dual_clip: bool, dual_clip_c: float, kl_coef: float, kl_estimator: str,
    entropy_coef: float, objective: str, delta: Optional[float], kl_bias_correction: bool, cispo_clip: str,
    cispo_max: float, sapo_tau_pos: float, sapo_tau_neg: float,
    # the model's head (erpo.linear_logprobs_and_entropy)
    logit_scale: float = 1.0, softcap: Optional[float] = None, head_fp32: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    given = locals()
    # the entropy bonus is aggregated on its own (bonus_weights): the policy term's coefficients run without it
    policy = TokenParams(**{f.name: given[f.name] for f in dataclasses.fields(TokenParams)} | {"entropy_coef": 0.0})

    def coefficients(idx, logp, entropy):
        _, dlogp, _, _, _ = token_terms(
            logp, entropy, old[idx], adv[idx], None if ref is None else ref[idx], None, policy, token_backend
        )
        dentropy = -entropy_coef * bonus_weights[idx] if entropy_coef != 0 else None
        return dlogp * weights[idx], dentropy

    flat_targets = targets.reshape(-1).contiguous()
    logp, entropy, _, grad_hidden, grad_weight, grad_bias = head.load(head_backend).forward_backward(
        row_layout(hidden), weight, bias, flat_targets, inv_temperature, ignore_index, coefficients,
        **head.head_kwargs(logit_scale, softcap, head_fp32)
    )
    grad_bias = grad_weight.new_empty(0) if grad_bias is None else grad_bias
    return logp.view(targets.shape), entropy.view(targets.shape), grad_hidden.view(hidden.shape), grad_weight, grad_bias


@_one_pass_op.register_fake
def _(hidden, weight, bias, targets, *args):
    f32 = torch.float32
    return (hidden.new_empty(targets.shape, dtype=f32), hidden.new_empty(targets.shape, dtype=f32),
            hidden.new_empty(hidden.shape, dtype=f32), weight.new_empty(weight.shape, dtype=f32),
            weight.new_empty((0,) if bias is None else (weight.shape[0],), dtype=f32))


class _PrecomputedGradient(torch.autograd.Function):
    """A 0-d zero whose backward hands out the gradient the one-pass forward already computed, scaled by the
    incoming gradient in place (the buffers are the gradients: no second full-size copy)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, grad_hidden, grad_weight, grad_bias):
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias if bias is not None else None)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.used = False
        return grad_hidden.new_zeros(())

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.used:
            raise RuntimeError("the one-pass fused-head loss supports one backward; use schedule='two_pass' "
                               "to backward through it more than once (retain_graph)")
        ctx.used = True
        grads = []
        for grad, dtype, needed in zip(ctx.saved_tensors, ctx.dtypes, ctx.needs_input_grad):
            grads.append(None if grad is None or not needed else grad.mul_(grad_out).to(dtype))
        return (*grads, None, None, None)
