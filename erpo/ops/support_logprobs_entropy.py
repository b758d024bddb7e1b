"""The fused op over the sampler's truncated support S (erpo/ops/support.py): logp and entropy of the
renormalised softmax(logits / T) over S, and in the same passes the same over the whole vocabulary, for losses
that take the ratio over S and the KL or the entropy terms over the full distribution.

Same shape as the full op: one forward read of each row (threshold, both row states), [N]-sized values saved
(lse and H of both, tau), one backward pass writing dlogits = the full distribution's term + the term over S
(zero outside S). The two passes are torch.library custom ops (torch.compile(fullgraph=True) sees opaque ops);
a support travels through them as three numbers (top_k 0 = none, top_p 1 = none, min_p 0 = none) or the ids.
Backends of the logits op (`backend`, resolved by `support_backend`): torch (CPU and CUDA tensors) and Triton,
both modes (kernels/logprobs_entropy.py forward_support/backward_support; "auto" picks it on CUDA tensors of
bf16/fp16/fp32 logits); the CUDA kernels take no support (refused). The fused head over S runs on torch.
"""
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from erpo.ops import backends
from erpo.ops import torch_linear_logprobs_entropy as torch_head
from erpo.ops.row_layout import contiguous_layout_like, row_layout
from erpo.ops.support import Support


class SupportResult(NamedTuple):
    logp: Tensor  # over S
    entropy: Tensor  # over S
    full_logp: Tensor  # over the whole vocabulary
    full_entropy: Tensor
    threshold: Tensor  # tau of the recompute mode (S = {x >= tau} plus the target); NaN in replay mode
    size: Tensor  # |S| per token (float; 0 on ignored rows)
    target_added: Tensor  # 1 where the target was below the recomputed threshold and added to S, else 0


def _support(top_k: int, top_p: float, min_p: float) -> Support:
    return Support(top_k or None, top_p if top_p < 1 else None, min_p or None)


def _flat(targets: Tensor, ids: Optional[Tensor]):
    return targets.reshape(-1).contiguous(), None if ids is None else ids.reshape(-1, ids.shape[-1]).contiguous()


SUPPORT_BACKENDS = ("torch", "triton")  # the logits op's kernels over S; the head's: torch


def support_backend(backend: str, logits: Tensor, replay: bool) -> str:
    """The backend that runs the logits op over S: "auto" is triton on CUDA tensors of bf16/fp16/fp32 logits (both
    modes), torch otherwise; "cuda" is refused in one line. (`replay`: the mode, for a backend that lacks one.)"""
    resolved = backends.resolve(backend, logits.is_cuda)
    if resolved == "triton" and backend == "auto" and logits.dtype == torch.float64:
        resolved = "torch"
    if resolved == "cuda":
        raise ValueError(f"backend={backend!r} has no kernel over a truncated support yet; use backend='torch' or "
                         "'triton' (or 'auto', which picks one)")
    return resolved


@torch.library.custom_op("erpo::support_logprobs_entropy_fwd", mutates_args=())
def _fwd_op(logits: Tensor, targets: Tensor, ids: Optional[Tensor], top_k: int, top_p: float, min_p: float,
            inv_temperature: float, ignore_index: int, backend: str) -> list[Tensor]:
    flat_targets, flat_ids = _flat(targets, ids)
    outs = backends.load(backend).forward_support(row_layout(logits), flat_targets, inv_temperature, ignore_index,
                                                  _support(top_k, top_p, min_p), flat_ids)
    return [out.view(targets.shape) for out in outs]


@_fwd_op.register_fake
def _(logits, targets, ids, top_k, top_p, min_p, inv_temperature, ignore_index, backend):
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return [logits.new_empty(targets.shape, dtype=dtype) for _ in range(9)]


@torch.library.custom_op("erpo::support_logprobs_entropy_bwd", mutates_args=())
def _bwd_op(logits: Tensor, targets: Tensor, ids: Optional[Tensor], saved: list[Tensor],
            grads: list[Optional[Tensor]], inv_temperature: float, ignore_index: int, backend: str) -> Tensor:
    flat_targets, flat_ids = _flat(targets, ids)
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    layout = row_layout(logits)
    flat = lambda t: None if t is None else t.reshape(-1)  # noqa: E731
    backends.load(backend).backward_support(layout, flat_targets, [flat(t) for t in saved],
                                            [flat(g) for g in grads], inv_temperature, ignore_index, flat_ids,
                                            contiguous_layout_like(layout, grad))
    return grad


@_bwd_op.register_fake
def _(logits, targets, ids, saved, grads, inv_temperature, ignore_index, backend):
    return logits.new_empty(logits.shape)


def _keep_for_backward(ctx, inputs: tuple, outs: list, inv_temperature: float, ignore_index: int) -> tuple:
    """Save the inputs and the per-row state both backward passes read (lse and H over S and over V, tau); return
    the differentiable results and, marked non-differentiable, tau, |S| and the added-target flags."""
    logp_s, h_s, lse_s, logp, h, lse, tau, size, added = outs
    ctx.save_for_backward(*inputs, lse_s, h_s, lse, h, tau)
    ctx.inv_temperature, ctx.ignore_index = inv_temperature, ignore_index
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(tau, size, added)
    return logp_s, h_s, logp, h, tau, size, added


class SupportFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, ids, top_k, top_p, min_p, inv_temperature, ignore_index, backend):
        outs = _fwd_op(logits, targets, ids, top_k, top_p, min_p, inv_temperature, ignore_index, backend)
        ctx.backend = backend
        return _keep_for_backward(ctx, (logits, targets, ids), outs, inv_temperature, ignore_index)

    @staticmethod
    def backward(ctx, g_logp_s, g_h_s, g_logp, g_h, *_):
        logits, targets, ids, *saved = ctx.saved_tensors
        grads = [g_logp_s, g_h_s, g_logp, g_h]
        if all(g is None for g in grads):
            return (None,) * 9
        grad = _bwd_op(logits, targets, ids, saved, grads, ctx.inv_temperature, ctx.ignore_index, ctx.backend)
        return (grad,) + (None,) * 8


def check_replay_targets(targets: Tensor, ids: Tensor, ignore_index: int) -> None:
    """Every scored target is one of its row's kept ids (one host sync, skipped with check_targets=False)."""
    flat_targets, flat_ids = _flat(targets, ids)
    scored = flat_targets != ignore_index
    inside = (flat_ids == flat_targets.unsqueeze(-1)).any(-1)
    empty = (flat_ids < 0).all(-1) if flat_ids.shape[-1] else torch.ones_like(scored)
    if bool((scored & empty).any()):
        row = int((scored & empty).nonzero()[0, 0])
        raise ValueError(f"support_ids: row {row} has no kept id (K = 0) but its target is scored")
    bad = scored & ~inside
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(f"support_ids: the target {int(flat_targets[row])} of row {row} is not in its kept set "
                         f"{flat_ids[row][flat_ids[row] >= 0].tolist()[:8]} (the engine sampled it from that set)")


def check_support_ids(ids, targets: Tensor, vocab: int, values: bool = True) -> None:
    """dtype, shape and device; with `values` (check_targets, one host sync) also every id in [-1, V)."""
    if not isinstance(ids, Tensor) or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise TypeError(f"support_ids must be an integer tensor [..., K] of kept ids padded with -1, got "
                        f"{getattr(ids, 'dtype', type(ids).__name__)}")
    if ids.dim() != targets.dim() + 1 or ids.shape[:-1] != targets.shape:
        raise ValueError(f"support_ids shape {tuple(ids.shape)} must be the targets' {tuple(targets.shape)} plus K")
    if ids.device != targets.device:
        raise ValueError(f"support_ids are on {ids.device} but targets on {targets.device}")
    if values and ids.numel() and bool(((ids < -1) | (ids >= vocab)).any()):
        raise ValueError(f"support_ids hold an id outside [0, {vocab}) that is not the padding -1")


def _knobs(support: Optional[Support], ids: Optional[Tensor], targets: Tensor, vocab: int, ignore_index: int,
           check: bool) -> tuple:
    """The support as the custom ops take it (top_k 0 = none, top_p 1 = none, min_p 0 = none); replay ids checked."""
    if ids is None:
        return support.top_k or 0, float(support.top_p or 1.0), float(support.min_p or 0.0)
    check_support_ids(ids, targets, vocab, values=check)
    if check:
        check_replay_targets(targets, ids, ignore_index)
    return 0, 1.0, 0.0


def support_logprobs_and_entropy(logits: Tensor, targets: Tensor, inv_temperature: float, ignore_index: int,
                                 support: Optional[Support], ids: Optional[Tensor], check: bool,
                                 backend: str = "torch") -> SupportResult:
    """Both results over S and over the whole vocabulary (see the module docstring); inputs already validated
    by logprobs_and_entropy except the support itself. `backend`: see support_backend; its default keeps the
    callers that pass none (the losses, the TRL drop-in) on torch, as before the Triton kernels existed."""
    backend = support_backend(backend, logits, ids is not None)
    knobs = _knobs(support, ids, targets, logits.shape[-1], ignore_index, check)
    args = (logits, targets, ids, *knobs, inv_temperature, ignore_index, backend)
    if torch.is_grad_enabled() and logits.requires_grad:
        return SupportResult(*SupportFunction.apply(*args))
    logp_s, h_s, _, logp, h, _, tau, size, added = _fwd_op(*args)
    return SupportResult(logp_s, h_s, logp, h, tau, size, added)


# ---- replay on Triton, S only: the forward reads the K kept logits of each row, not V -----------------------

@torch.library.custom_op("erpo::replay_logprobs_entropy_fwd", mutates_args=())
def _replay_logits_fwd_op(logits: Tensor, targets: Tensor, ids: Tensor, inv_temperature: float,
                          ignore_index: int) -> list[Tensor]:
    flat_targets, flat_ids = _flat(targets, ids)
    logp, entropy, lse, _ = backends.load("triton").replay_forward(row_layout(logits), flat_targets, inv_temperature,
                                                                   ignore_index, flat_ids)
    return [out.view(targets.shape) for out in (logp, entropy, lse)]


@_replay_logits_fwd_op.register_fake
def _(logits, targets, ids, inv_temperature, ignore_index):
    return [logits.new_empty(targets.shape, dtype=torch.float32) for _ in range(3)]


@torch.library.custom_op("erpo::replay_logprobs_entropy_bwd", mutates_args=())
def _replay_logits_bwd_op(logits: Tensor, targets: Tensor, ids: Tensor, lse: Tensor, entropy: Tensor,
                          grad_logp: Optional[Tensor], grad_entropy: Optional[Tensor], inv_temperature: float,
                          ignore_index: int) -> Tensor:
    flat_targets, flat_ids = _flat(targets, ids)
    grad = torch.zeros(logits.shape, dtype=logits.dtype, device=logits.device)  # zero outside S
    layout = row_layout(logits)
    flat = lambda t: None if t is None else t.reshape(-1)  # noqa: E731
    backends.load("triton").replay_backward(layout, flat_targets, flat_ids, flat(lse), flat(entropy), flat(grad_logp),
                                            flat(grad_entropy), inv_temperature, ignore_index,
                                            contiguous_layout_like(layout, grad), accumulate=False)
    return grad


@_replay_logits_bwd_op.register_fake
def _(logits, targets, ids, lse, entropy, grad_logp, grad_entropy, inv_temperature, ignore_index):
    return logits.new_empty(logits.shape)


class ReplayFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, ids, inv_temperature, ignore_index):
        logp, entropy, lse = _replay_logits_fwd_op(logits, targets, ids, inv_temperature, ignore_index)
        ctx.save_for_backward(logits, targets, ids, lse, entropy)
        ctx.inv_temperature, ctx.ignore_index = inv_temperature, ignore_index
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        logits, targets, ids, lse, entropy = ctx.saved_tensors
        if grad_logp is None and grad_entropy is None:
            return (None,) * 5
        return (_replay_logits_bwd_op(logits, targets, ids, lse, entropy, grad_logp, grad_entropy,
                                      ctx.inv_temperature, ctx.ignore_index),) + (None,) * 4


def replay_logprobs_and_entropy(logits: Tensor, targets: Tensor, inv_temperature: float, ignore_index: int,
                                ids: Tensor, check: bool):
    """(logp, entropy) over the replayed kept sets on the Triton backend, reading only the K kept logits of each
    row in the forward (the backward writes the dense gradient, zero outside S)."""
    _knobs(None, ids, targets, logits.shape[-1], ignore_index, check)
    args = (logits, targets, ids, inv_temperature, ignore_index)
    if torch.is_grad_enabled() and logits.requires_grad:
        return ReplayFunction.apply(*args)
    logp, entropy, _ = _replay_logits_fwd_op(*args)
    return logp, entropy


# ---- the fused head over S: the same from the hidden states and the LM head --------------------------------

@torch.library.custom_op("erpo::support_linear_logprobs_entropy_fwd", mutates_args=())
def _linear_fwd_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, ids: Optional[Tensor],
                   top_k: int, top_p: float, min_p: float, inv_temperature: float, ignore_index: int) -> list[Tensor]:
    flat_targets, flat_ids = _flat(targets, ids)
    outs = torch_head.forward_support(row_layout(hidden), weight, bias, flat_targets, inv_temperature, ignore_index,
                                      _support(top_k, top_p, min_p), flat_ids)
    return [out.view(targets.shape) for out in outs]


@_linear_fwd_op.register_fake
def _(hidden, weight, bias, targets, ids, top_k, top_p, min_p, inv_temperature, ignore_index):
    return [hidden.new_empty(targets.shape, dtype=torch.float32) for _ in range(9)]


@torch.library.custom_op("erpo::support_linear_logprobs_entropy_bwd", mutates_args=())
def _linear_bwd_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, ids: Optional[Tensor],
                   saved: list[Tensor], grads: list[Optional[Tensor]], inv_temperature: float,
                   ignore_index: int) -> list[Tensor]:
    flat_targets, flat_ids = _flat(targets, ids)
    flat = lambda t: None if t is None else t.reshape(-1)  # noqa: E731
    grad_hidden, grad_weight, grad_bias = torch_head.backward_support(
        row_layout(hidden), weight, bias, flat_targets, [flat(t) for t in saved], [flat(g) for g in grads],
        inv_temperature, ignore_index, flat_ids)
    grad_bias = grad_weight.new_zeros(0) if grad_bias is None else grad_bias
    return [grad_hidden.view(hidden.shape), grad_weight, grad_bias]


@_linear_bwd_op.register_fake
def _(hidden, weight, bias, targets, ids, saved, grads, inv_temperature, ignore_index):
    grad_bias = weight.new_empty(0 if bias is None else weight.shape[0], dtype=torch.float32)
    return [hidden.new_empty(hidden.shape, dtype=torch.float32), weight.new_empty(weight.shape, dtype=torch.float32),
            grad_bias]


class SupportLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ids, top_k, top_p, min_p, inv_temperature, ignore_index):
        outs = _linear_fwd_op(hidden, weight, bias, targets, ids, top_k, top_p, min_p, inv_temperature, ignore_index)
        return _keep_for_backward(ctx, (hidden, weight, bias, targets, ids), outs, inv_temperature, ignore_index)

    @staticmethod
    def backward(ctx, g_logp_s, g_h_s, g_logp, g_h, *_):
        hidden, weight, bias, targets, ids, *saved = ctx.saved_tensors
        grads = [g_logp_s, g_h_s, g_logp, g_h]
        if all(g is None for g in grads):
            return (None,) * 10
        grad_hidden, grad_weight, grad_bias = _linear_bwd_op(hidden, weight, bias, targets, ids, saved, grads,
                                                             ctx.inv_temperature, ctx.ignore_index)
        needs = ctx.needs_input_grad
        return (grad_hidden.to(hidden.dtype) if needs[0] else None, grad_weight.to(weight.dtype) if needs[1] else None,
                grad_bias.to(bias.dtype) if bias is not None and needs[2] else None) + (None,) * 7


def support_linear_logprobs_and_entropy(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                                        inv_temperature: float, ignore_index: int, support: Optional[Support],
                                        ids: Optional[Tensor], check: bool) -> SupportResult:
    """The fused head's results over S and over the whole vocabulary; inputs validated by the caller."""
    knobs = _knobs(support, ids, targets, weight.shape[0], ignore_index, check)
    args = (hidden, weight, bias, targets, ids, *knobs, inv_temperature, ignore_index)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias)):
        return SupportResult(*SupportLinearFunction.apply(*args))
    logp_s, h_s, _, logp, h, _, tau, size, added = _linear_fwd_op(*args)
    return SupportResult(logp_s, h_s, logp, h, tau, size, added)


# ---- replay from the head, S only: K dot products per token instead of V -------------------------------------

@torch.library.custom_op("erpo::replay_linear_logprobs_entropy_fwd", mutates_args=())
def _replay_fwd_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, ids: Tensor,
                   inv_temperature: float, ignore_index: int) -> list[Tensor]:
    flat_targets, flat_ids = _flat(targets, ids)
    outs = torch_head.replay_forward(row_layout(hidden), weight, bias, flat_targets, inv_temperature, ignore_index,
                                     flat_ids)
    return [out.view(targets.shape) for out in outs]


@_replay_fwd_op.register_fake
def _(hidden, weight, bias, targets, ids, inv_temperature, ignore_index):
    return [hidden.new_empty(targets.shape, dtype=torch.float32) for _ in range(3)]


@torch.library.custom_op("erpo::replay_linear_logprobs_entropy_bwd", mutates_args=())
def _replay_bwd_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, ids: Tensor, lse: Tensor,
                   entropy: Tensor, grad_logp: Optional[Tensor], grad_entropy: Optional[Tensor],
                   inv_temperature: float, ignore_index: int) -> list[Tensor]:
    flat_targets, flat_ids = _flat(targets, ids)
    flat = lambda t: None if t is None else t.reshape(-1)  # noqa: E731
    grad_hidden, grad_weight, grad_bias = torch_head.replay_backward(
        row_layout(hidden), weight, bias, flat_targets, flat_ids, flat(lse), flat(entropy), flat(grad_logp),
        flat(grad_entropy), inv_temperature, ignore_index)
    return [grad_hidden.view(hidden.shape), grad_weight, grad_weight.new_zeros(0) if grad_bias is None else grad_bias]


@_replay_bwd_op.register_fake
def _(hidden, weight, bias, targets, ids, lse, entropy, grad_logp, grad_entropy, inv_temperature, ignore_index):
    grad_bias = weight.new_empty(0 if bias is None else weight.shape[0], dtype=torch.float32)
    return [hidden.new_empty(hidden.shape, dtype=torch.float32), weight.new_empty(weight.shape, dtype=torch.float32),
            grad_bias]


class ReplayLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ids, inv_temperature, ignore_index):
        logp, entropy, lse = _replay_fwd_op(hidden, weight, bias, targets, ids, inv_temperature, ignore_index)
        ctx.save_for_backward(hidden, weight, bias, targets, ids, lse, entropy)
        ctx.inv_temperature, ctx.ignore_index = inv_temperature, ignore_index
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, targets, ids, lse, entropy = ctx.saved_tensors
        if grad_logp is None and grad_entropy is None:
            return (None,) * 7
        grad_hidden, grad_weight, grad_bias = _replay_bwd_op(hidden, weight, bias, targets, ids, lse, entropy,
                                                             grad_logp, grad_entropy, ctx.inv_temperature,
                                                             ctx.ignore_index)
        needs = ctx.needs_input_grad
        return (grad_hidden.to(hidden.dtype) if needs[0] else None, grad_weight.to(weight.dtype) if needs[1] else None,
                grad_bias.to(bias.dtype) if bias is not None and needs[2] else None) + (None,) * 4


def replay_linear_logprobs_and_entropy(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                                       inv_temperature: float, ignore_index: int, ids: Tensor, check: bool):
    """(logp, entropy) over the replayed kept sets, from the K kept rows of the head per token (O(N K H))."""
    _knobs(None, ids, targets, weight.shape[0], ignore_index, check)
    args = (hidden, weight, bias, targets, ids, inv_temperature, ignore_index)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias)):
        return ReplayLinearFunction.apply(*args)
    logp, entropy, _ = _replay_fwd_op(*args)
    return logp, entropy
