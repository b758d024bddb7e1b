"""`logprobs_and_entropy`: per-token log-prob of the target and entropy of softmax(logits / T), fused.

The forward is one pass over V per row and keeps only the logits and two floats per row (lse, entropy) for
the backward, which is one more pass writing dlogits (optionally into the logits' own storage). Nothing of
size [N, V] in float32 is ever materialised.

`shift=True` takes the unsliced `[..., L+1, V]` logits of a causal LM and scores positions 0..L-1 (the
forward reads them through a strided view, no copy); the backward runs over all L+1 positions with the
dropped one marked ignored, so the kernel itself writes its zero gradient and the gradient reaching the
model is one `[..., L+1, V]` tensor (the logits' own storage with `inplace_grad`), never a slice of one
that autograd would have to copy into a fresh zero buffer.

The two passes are registered as torch.library custom ops, so `torch.compile(fullgraph=True)` sees opaque
ops (with shape functions) instead of trying to trace Triton, and one autograd.Function ties them together.
"""
import math
from typing import Optional

import torch
from torch import Tensor

from erpo.ops import backends, row_stats, vocab_parallel
from erpo.ops.row_layout import addressable_in_place, contiguous_layout_like, row_layout

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _flat_targets(targets: Tensor) -> Tensor:
    flat = targets.reshape(-1)
    flat = flat if flat.dtype in (torch.int32, torch.int64) else flat.long()
    return flat.contiguous()  # kernels read targets_ptr + row: a strided view (targets[::2]) must be copied


def _check_target_range(targets: Tensor, vocab: int, ignore_index: int) -> None:
    """The one host sync allowed on the hot path (skipped with check_targets=False)."""
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    if bool(bad.any()):
        index = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"target id {int(targets[index])} at flat position {index} is out of range [0, {vocab}) "
            f"(and is not ignore_index={ignore_index})"
        )


def _scored_rows(logits: Tensor, shift: bool) -> Tensor:
    """The positions that are scored: all of them, or with shift all but the last (a view, no copy)."""
    return logits.narrow(-2, 0, logits.shape[-2] - 1) if shift else logits


def _append_dropped(values: Tensor, fill) -> Tensor:
    """[..., L] -> [..., L+1]: the dropped (last) position's entry appended along the position dim."""
    return torch.cat([values, values.new_full((*values.shape[:-1], 1), fill)], dim=-1)


@torch.library.custom_op("erpo::logprobs_entropy_fwd", mutates_args=())
def _fwd_op(
    logits: Tensor, targets: Tensor, inv_temperature: float, ignore_index: int, backend: str, check_targets: bool,
    shift: bool = False, logit_scale: float = 1.0, softcap: Optional[float] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    flat_targets = _flat_targets(targets)
    if check_targets:
        _check_target_range(flat_targets, logits.shape[-1], ignore_index)
    layout = row_layout(_scored_rows(logits, shift))
    logp, entropy, lse = backends.load(backend).forward(layout, flat_targets, inv_temperature, ignore_index,
                                                        **_transform_kwargs(logit_scale, softcap))
    shape = targets.shape
    return logp.view(shape), entropy.view(shape), lse.view(shape)


@_fwd_op.register_fake
def _(logits, targets, inv_temperature, ignore_index, backend, check_targets, shift=False, logit_scale=1.0,
      softcap=None):
    out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    make = lambda: logits.new_empty(targets.shape, dtype=out_dtype)  # noqa: E731
    return make(), make(), make()


def _transform_kwargs(logit_scale: float, softcap: Optional[float]) -> dict:
    """The backends' logit-transform keywords, given only where the head is not plain (a backend without them,
    e.g. an older out-of-tree one, keeps working on plain heads)."""
    if softcap is None and logit_scale == 1.0:
        return {}
    return {"logit_scale": logit_scale, "softcap": softcap}


def _backward_into(grad_out, logits, targets, lse, entropy, grad_logp, grad_entropy, inv_temperature, ignore_index,
                   backend, shift=False, logit_scale=1.0, softcap=None):
    if shift:
        # Every position of the full logits gets its gradient from this one kernel launch: the dropped one
        # is an ignored row (zero gradient, not read). Only [N]-sized per-row values are padded.
        targets = _append_dropped(targets, ignore_index)
        lse, entropy = _append_dropped(lse, 0.0), _append_dropped(entropy, 0.0)
        grad_logp = None if grad_logp is None else _append_dropped(grad_logp, 0.0)
        grad_entropy = None if grad_entropy is None else _append_dropped(grad_entropy, 0.0)
    layout = row_layout(logits)
    grad_layout = layout if grad_out is logits else contiguous_layout_like(layout, grad_out)
    backends.load(backend).backward(
        layout, _flat_targets(targets), lse.reshape(-1), entropy.reshape(-1),
        None if grad_logp is None else grad_logp.reshape(-1).contiguous(),
        None if grad_entropy is None else grad_entropy.reshape(-1).contiguous(),
        inv_temperature, ignore_index, grad_layout, **_transform_kwargs(logit_scale, softcap),
    )


@torch.library.custom_op("erpo::logprobs_entropy_bwd", mutates_args=())
def _bwd_op(
    logits: Tensor, targets: Tensor, lse: Tensor, entropy: Tensor,
    grad_logp: Optional[Tensor], grad_entropy: Optional[Tensor],
    inv_temperature: float, ignore_index: int, backend: str, shift: bool = False, logit_scale: float = 1.0,
    softcap: Optional[float] = None,
) -> Tensor:
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    _backward_into(grad, logits, targets, lse, entropy, grad_logp, grad_entropy, inv_temperature, ignore_index,
                   backend, shift, logit_scale, softcap)
    return grad


@_bwd_op.register_fake
def _(logits, targets, lse, entropy, grad_logp, grad_entropy, inv_temperature, ignore_index, backend, shift=False,
      logit_scale=1.0, softcap=None):
    return logits.new_empty(logits.shape)


@torch.library.custom_op("erpo::logprobs_entropy_bwd_inplace", mutates_args=("logits",))
def _bwd_inplace_op(
    logits: Tensor, targets: Tensor, lse: Tensor, entropy: Tensor,
    grad_logp: Optional[Tensor], grad_entropy: Optional[Tensor],
    inv_temperature: float, ignore_index: int, backend: str, shift: bool = False, logit_scale: float = 1.0,
    softcap: Optional[float] = None,
) -> None:
    _backward_into(logits, logits, targets, lse, entropy, grad_logp, grad_entropy, inv_temperature, ignore_index,
                   backend, shift, logit_scale, softcap)


class LogprobsEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, inv_temperature, ignore_index, inplace_grad, backend, check_targets, shift,
                logit_scale=1.0, softcap=None):
        logp, entropy, lse = _fwd_op(logits, targets, inv_temperature, ignore_index, backend, check_targets, shift,
                                     logit_scale, softcap)
        ctx.save_for_backward(logits, targets, lse, entropy)
        ctx.inv_temperature = inv_temperature
        ctx.transform = (logit_scale, softcap)
        ctx.ignore_index = ignore_index
        # Rows the kernels read from a copy cannot take the gradient in place: it would land in the copy.
        ctx.inplace_grad = inplace_grad and addressable_in_place(logits)
        ctx.backend = backend
        ctx.shift = shift
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        return (_grad_logits(ctx, grad_logp, grad_entropy),) + (None,) * 9


def _grad_logits(ctx, grad_logp, grad_entropy) -> Optional[Tensor]:
    logits, targets, lse, entropy = ctx.saved_tensors
    if grad_logp is None and grad_entropy is None:
        return None
    args = (targets, lse, entropy, grad_logp, grad_entropy, ctx.inv_temperature, ctx.ignore_index, ctx.backend,
            ctx.shift, *ctx.transform)
    if ctx.inplace_grad:
        _bwd_inplace_op(logits, *args)
        return logits
    return _bwd_op(logits, *args)


def _vocab_parallel_forward(logits, targets, inv_temperature, ignore_index, backend, check_targets, group,
                            vocab_size, logit_scale=1.0, softcap=None):
    """(logp, entropy, lse, local targets) of a vocabulary slice merged over the group (erpo/ops/vocab_parallel.py)."""
    local_vocab = logits.shape[-1]
    offset, total = vocab_parallel.shard_offset(local_vocab, group, logits.device, vocab_size)
    if check_targets:
        _check_target_range(_flat_targets(targets), total, ignore_index)
    local = vocab_parallel.local_targets(targets, offset, local_vocab, ignore_index)
    logp_r, entropy_r, lse_r = _fwd_op(logits, local, inv_temperature, ignore_index, backend, False, False,
                                       logit_scale, softcap)
    logp, entropy, lse = vocab_parallel.merge(logp_r.reshape(-1), entropy_r.reshape(-1), lse_r.reshape(-1),
                                              local.reshape(-1), local_vocab, ignore_index, group)
    shape = targets.shape
    return logp.view(shape), entropy.view(shape), lse.view(shape), local


class VocabParallelLogprobsEntropyFunction(torch.autograd.Function):
    """The op on this rank's vocabulary slice; the backward needs no collective (merged lse and H are saved)."""

    @staticmethod
    def forward(ctx, logits, targets, inv_temperature, ignore_index, inplace_grad, backend, check_targets, group,
                vocab_size, logit_scale=1.0, softcap=None):
        logp, entropy, lse, local = _vocab_parallel_forward(
            logits, targets, inv_temperature, ignore_index, backend, check_targets, group, vocab_size, logit_scale,
            softcap)
        ctx.save_for_backward(logits, local, lse, entropy)
        ctx.inv_temperature, ctx.ignore_index, ctx.backend = inv_temperature, ignore_index, backend
        ctx.transform = (logit_scale, softcap)
        ctx.inplace_grad = inplace_grad and addressable_in_place(logits)
        ctx.shift = False  # refused with a process group (logprobs_and_entropy)
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        return (_grad_logits(ctx, grad_logp, grad_entropy),) + (None,) * 10


def _validate(logits, targets, temperature, backend, inplace_grad, shift) -> str:
    if not isinstance(logits, Tensor) or not isinstance(targets, Tensor):
        raise TypeError(f"logits and targets must be tensors, got {type(logits).__name__} and {type(targets).__name__}")
    if not isinstance(shift, bool):
        raise TypeError(f"shift must be True or False, got {type(shift).__name__}")
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have shape [..., V] with V >= 1, got {tuple(logits.shape)}")
    if shift:
        if logits.dim() < 2 or logits.shape[-2] < 1:
            raise ValueError(f"shift=True needs logits [..., L+1, V] with L+1 >= 1, got {tuple(logits.shape)}")
        expected = (*logits.shape[:-2], logits.shape[-2] - 1)
        if targets.shape != expected:
            raise ValueError(
                f"with shift=True, targets shape {tuple(targets.shape)} must be the logits' positions minus the "
                f"last one, {expected} (logits {tuple(logits.shape)})"
            )
    elif targets.shape != logits.shape[:-1]:
        raise ValueError(
            f"targets shape {tuple(targets.shape)} must equal logits shape without the vocab dim "
            f"{tuple(logits.shape[:-1])} (logits {tuple(logits.shape)})"
        )
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"targets must hold integer token ids, got dtype {targets.dtype}")
    if logits.device != targets.device:
        raise ValueError(f"logits are on {logits.device} but targets on {targets.device}")
    if isinstance(temperature, (Tensor, bool)) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a Python number, got {type(temperature).__name__}")
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    resolved = backends.resolve(backend, logits.is_cuda)
    allowed = FLOAT_DTYPES + ((torch.float64,) if resolved == "torch" else ())
    if logits.dtype not in allowed:
        raise TypeError(
            f"logits dtype {logits.dtype} is not supported by backend={resolved!r}; "
            f"supported: {', '.join(str(d) for d in allowed)}"
        )
    if inplace_grad and logits.is_leaf and logits.requires_grad:
        raise ValueError(
            "inplace_grad=True writes the gradient into the logits' storage, which is impossible for a leaf "
            "tensor that requires grad (its .grad would alias its data); use inplace_grad=False"
        )
    backends.check_available(resolved, logits.is_cuda)
    return resolved


def logprobs_and_entropy(
    logits: Tensor,
    targets: Tensor,
    temperature: float = 1.0,
    ignore_index: int = -100,
    inplace_grad: bool = False,
    backend: str = "auto",
    check_targets: bool = True,
    shift: bool = False,
    process_group=None,
    vocab_size: Optional[int] = None,
    support=None,
    support_ids: Optional[Tensor] = None,
    softcap: Optional[float] = None,
    logit_scale: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Per-token log-prob of `targets` and entropy of softmax(logits / temperature), without [N, V] temporaries.

    Args:
        logits: `[..., V]` bf16, fp16 or fp32 (fp64 on the torch backend). Rows may be strided
            (e.g. `hidden_logits[:, :-1, :]`): no copy is made.
        targets: integer ids of shape `[...]`; `ignore_index` rows give logp = entropy = 0 and zero gradient.
        temperature: divides the logits (a runtime value: no recompilation per value).
        inplace_grad: write dlogits into the logits' own storage during backward (halves peak memory).
            Safe only when nothing reads these logits after the backward starts: not the caller, and not
            another autograd node that saved them (that case is caught: autograd raises "modified by an
            inplace operation" because the op bumps the logits' version). Not allowed on leaf tensors.
            Logits whose leading dims do not merge into two strides (rare) are copied for the kernels anyway;
            their gradient then gets a buffer of its own.
        backend: "auto" (triton on CUDA tensors, torch on CPU), "torch", "triton" or "cuda".
        check_targets: validate target ids are in [0, V) (one host sync); pass False on a hot path whose
            targets are known good.
        shift: `logits` are the unsliced `[..., L+1, V]` output of a causal LM and `targets` are `[..., L]`:
            position i of the logits scores targets[..., i] and the last position is dropped. Same values as
            passing `logits[..., :-1, :]`, but the backward writes the whole `[..., L+1, V]` gradient (zero at
            the dropped position) in one kernel, so autograd allocates no extra full-size buffer for a slice,
            and with `inplace_grad` the gradient reaching the model is the logits' own storage.
        process_group: a torch.distributed group over which the vocabulary is sharded: `logits` is this
            rank's contiguous slice [..., V_r] (ranks in order, uneven slices allowed), `targets` are global
            ids, the same on every rank; the outputs are those of the whole vocabulary, on every rank
            (one all_gather per forward, none in the backward; see erpo/ops/vocab_parallel.py).
        vocab_size: the whole vocabulary, checked against the sum of the slices (or against V without a group).
        support: an `erpo.Support(top_k, top_p, min_p)`: score against the truncated distribution the sampler
            drew from (recomputed from these logits, vLLM's order and rule; docs/support.md), renormalised.
        support_ids: `[..., K]` integer ids of each row's kept set, padded with -1 (the set the engine recorded;
            `erpo.support_ids_from_csr` converts vLLM's CSR form); every scored target must be in its row's set.
            With either, logp and entropy are those over S and gradients reach the logits of S only. Backends:
            torch; triton in recompute mode ("auto" picks it on CUDA tensors); not cuda.
        softcap, logit_scale: the model's final logit soft-capping c (Gemma 2/3's `final_logit_softcapping`) and
            logit scale s (Cohere's `logit_scale`): the softmax is that of x = c tanh(s y / c) / T (x = s y / T
            without a cap), y the given logits, applied element by element in the kernels (no [N, V] copy);
            gradients are w.r.t. y (the chain rule through tanh: dy = dx (1 - (x T / c)^2) s / T). Defaults
            (None, 1.0) are the plain head, bit for bit. Under a cap, +-inf logits become +-c, as in the model.
            Torch and Triton backends (the CUDA one refuses them); not with a support yet.

    Returns:
        (logp, entropy), float32 (float64 for float64 logits), shape `[...]`, differentiable w.r.t. logits.
        A row with NaN or +inf logits, or only -inf, gives non-finite outputs for that row only; `-inf`
        entries in an otherwise finite row are a masked vocabulary (p = 0, zero gradient).
    """
    row_stats.check_logit_transform(logit_scale, softcap)
    transform = (float(logit_scale), None if softcap is None else float(softcap))
    if support_ids is not None or (support is not None and not full_support(support, logits.shape[-1])):
        check_plain_for_support(*transform)
        return _on_support(logits, targets, temperature, ignore_index, inplace_grad, backend, check_targets, shift,
                           process_group, support, support_ids)
    check_backend_transform(backend, *transform)
    resolved = _validate(logits, targets, temperature, backend, inplace_grad, shift)
    check_backend_transform(resolved, *transform)
    inv_temperature = 1.0 / float(temperature)
    if process_group is not None:
        if shift:
            raise ValueError("shift=True is not supported with a process_group yet: pass logits[..., :-1, :]")
        vocab_parallel.check_group(process_group)
        if torch.is_grad_enabled() and logits.requires_grad:
            return VocabParallelLogprobsEntropyFunction.apply(
                logits, targets, inv_temperature, ignore_index, inplace_grad, resolved, check_targets, process_group,
                vocab_size, *transform)
        logp, entropy, _, _ = _vocab_parallel_forward(logits, targets, inv_temperature, ignore_index, resolved,
                                                      check_targets, process_group, vocab_size, *transform)
        return logp, entropy
    if vocab_size is not None and vocab_size != logits.shape[-1]:
        raise ValueError(f"vocab_size={vocab_size} but the logits hold V = {logits.shape[-1]} ids (no process_group)")
    if torch.is_grad_enabled() and logits.requires_grad:
        return LogprobsEntropyFunction.apply(
            logits, targets, inv_temperature, ignore_index, inplace_grad, resolved, check_targets, shift, *transform
        )
    # Inference (old-policy / reference log-probs): nothing is saved for a backward.
    logp, entropy, _ = _fwd_op(logits, targets, inv_temperature, ignore_index, resolved, check_targets, shift,
                               *transform)
    return logp, entropy


def check_backend_transform(backend: str, logit_scale: float, softcap: Optional[float]) -> None:
    if backend == "cuda" and (softcap is not None or logit_scale != 1.0):
        raise ValueError("backend='cuda' does not implement softcap/logit_scale; use backend='triton' or 'torch'")


def check_plain_for_support(logit_scale: float, softcap: Optional[float], head_fp32: bool = False) -> None:
    if softcap is not None or logit_scale != 1.0 or head_fp32:
        raise ValueError("softcap/logit_scale/head_fp32 with a truncated support (support=, support_ids=) are not "
                         "supported yet")


def full_support(support, vocab: int) -> bool:
    from erpo.ops.support import Support

    if not isinstance(support, Support):
        raise TypeError(f"support must be an erpo.Support(top_k=, top_p=, min_p=), got {type(support).__name__}")
    return support.is_full(vocab)


def _on_support(logits, targets, temperature, ignore_index, inplace_grad, backend, check_targets, shift,
                process_group, support, support_ids):
    """logprobs_and_entropy over the sampler's truncated support (erpo/ops/support_logprobs_entropy.py)."""
    from erpo.ops.support_logprobs_entropy import (SUPPORT_BACKENDS, replay_logprobs_and_entropy, support_backend,
                                                   support_logprobs_and_entropy)

    check_support_args(support, support_ids, backend, inplace_grad, process_group, kernels=SUPPORT_BACKENDS)
    if not isinstance(logits, Tensor):
        raise TypeError(f"logits and targets must be tensors, got {type(logits).__name__} and {type(targets).__name__}")
    resolved = support_backend(backend, logits, support_ids is not None)
    _validate(logits, targets, temperature, resolved, False, shift)
    if check_targets:
        _check_target_range(_flat_targets(targets), logits.shape[-1], ignore_index)
    if support_ids is not None and resolved == "triton":  # S only: the forward gathers the K kept logits
        return replay_logprobs_and_entropy(_scored_rows(logits, shift), targets, 1.0 / float(temperature),
                                           ignore_index, support_ids, check_targets)
    result = support_logprobs_and_entropy(_scored_rows(logits, shift), targets, 1.0 / float(temperature),
                                          ignore_index, support, support_ids, check_targets, resolved)
    return result.logp, result.entropy


def check_support_args(support, support_ids, backend: str, inplace_grad: bool, process_group,
                       kernels: tuple = ("torch",)) -> None:
    """What a support cannot be combined with yet, each refused in one line; `kernels`: the backends the caller
    has over a support (the logits op: torch and triton; the fused head: torch)."""
    if support is not None and support_ids is not None:
        raise ValueError("give support= (recompute the truncation) or support_ids= (replay the engine's kept sets), "
                         "not both")
    if backend in ("triton", "cuda") and backend not in kernels:
        raise ValueError(f"backend={backend!r} has no kernel over a truncated support yet; use backend='torch' (or "
                         "'auto', which picks a backend that has one)")
    if inplace_grad:
        raise ValueError("inplace_grad=True is not supported with a support yet")
    if process_group is not None:
        raise ValueError("a support with process_group= (a sharded vocabulary) is not supported yet")
