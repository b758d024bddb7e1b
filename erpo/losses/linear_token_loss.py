"""`linear_token_loss`: any per-token loss of (logp, entropy) straight from the hidden states and the LM head, on
the fused head's one-pass schedule (3 matmuls: the gradient is formed while each chunk's logits are in memory).

`linear_logprobs_and_entropy` cannot know what consumes its outputs, so it keeps the two-pass schedule (4 matmuls).
A trainer whose loss is a sum over tokens of f(logp_t, H_t, per-token inputs) (TRL-style losses, distillation
terms, an entropy bonus) hands f here instead: each chunk's row statistics go through f under autograd, which gives
that chunk's coefficients d loss / d logp and d loss / d H, and the head's torch backend turns them into dHidden,
dWeight and dBias in the same pass (erpo/ops/torch_linear_logprobs_entropy.py `forward_backward`).

f must be row-local: token t's loss may depend on logp_t, H_t and the t-th entries of `inputs` only (the chunks
see a subset of the rows). A callable cannot pass through a custom op, so this entry is not torch.compile-able;
`linear_policy_loss` covers the policy losses with compile support.
"""
from typing import Callable, Optional

import torch
from torch import Tensor

from erpo.losses.linear_policy_loss import _PrecomputedGradient
from erpo.ops import linear_logprobs_entropy as head
from erpo.ops.row_layout import row_layout

IGNORE_INDEX = -100


def linear_token_loss(hidden: Tensor, weight: Tensor, targets: Tensor, loss_fn: Callable[..., Tensor],
                      inputs: Optional[dict] = None, bias: Optional[Tensor] = None, temperature: float = 1.0,
                      ignore_index: int = IGNORE_INDEX, check_targets: bool = True):
    """(loss, logp, entropy): loss = sum over the scored tokens of loss_fn(logp, entropy, **inputs), 0-d, whose
    backward reaches hidden, weight and bias; logp and entropy float32 shaped like targets, detached.

    `inputs`: tensors shaped like `targets` (advantages per token, old log-probs, weights...), handed to loss_fn
    row by row with the statistics. Ignored rows (`ignore_index`) add nothing. One backward only.
    """
    inputs = dict(inputs or {})
    head.validate(hidden, weight, targets, bias, temperature, "torch")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be a callable (logp, entropy, **inputs) -> per-token loss, got "
                        f"{type(loss_fn).__name__}")
    for name, value in inputs.items():
        if not isinstance(value, Tensor) or value.shape != targets.shape:
            raise ValueError(f"inputs[{name!r}] must be a tensor shaped like targets {tuple(targets.shape)}, got "
                             f"{getattr(value, 'shape', type(value).__name__)}")
    flat_targets = targets.reshape(-1).contiguous()
    if check_targets:
        head._check_target_range(flat_targets, weight.shape[0], ignore_index)
    flat_inputs = {name: value.reshape(-1) for name, value in inputs.items()}
    scored = flat_targets != ignore_index

    def coefficients(idx, logp, entropy):
        with torch.enable_grad():
            lp, h = logp.detach().requires_grad_(), entropy.detach().requires_grad_()
            per_token = loss_fn(lp, h, **{name: value[idx] for name, value in flat_inputs.items()})
            _check_per_token(per_token, lp)
            g_logp, g_ent = torch.autograd.grad((per_token * scored[idx]).sum(), (lp, h), allow_unused=True)
        return g_logp, g_ent

    logp, entropy, _, grad_hidden, grad_weight, grad_bias = head.load("torch").forward_backward(
        row_layout(hidden.detach()), weight.detach().contiguous(), None if bias is None else bias.detach(),
        flat_targets, 1.0 / float(temperature), ignore_index, coefficients)
    with torch.no_grad():
        per_token = loss_fn(logp, entropy, **flat_inputs)
        _check_per_token(per_token, logp)
        value = torch.where(scored, per_token, torch.zeros_like(per_token)).sum()
    attached = _PrecomputedGradient.apply(hidden, weight, bias, grad_hidden.view(hidden.shape), grad_weight,
                                          grad_weight.new_empty(0) if grad_bias is None else grad_bias)
    return value + attached, logp.view(targets.shape), entropy.view(targets.shape)


def _check_per_token(per_token, logp: Tensor) -> None:
    if not isinstance(per_token, Tensor) or per_token.shape != logp.shape:
        raise ValueError(f"loss_fn must return one loss per token, shaped like its logp {tuple(logp.shape)}, got "
                         f"{getattr(per_token, 'shape', type(per_token).__name__)}")
