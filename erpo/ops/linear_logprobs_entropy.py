"""`linear_logprobs_and_entropy`: log-prob of the target and entropy straight from the hidden states and the
LM head, `logprobs_and_entropy(hidden @ weight.T + bias, targets)` without ever holding the [N, V] logits.

The forward (stats pass) keeps only the inputs and two floats per row (lse, entropy); the backward
(gradient pass) recomputes the logits chunk by chunk and accumulates grad_hidden, grad_weight and grad_bias.
Both are torch.library custom ops, tied by one autograd.Function, so `torch.compile(fullgraph=True)` sees
opaque ops with shape functions. Backends (same two functions, see docs/fused_head.md): "torch" (chunked
matmuls, erpo/ops/torch_linear_logprobs_entropy.py) and "triton" (a fused tile kernel,
kernels/linear_logprobs_entropy.py). "auto" is torch on CPU and on CUDA until a GPU measurement says otherwise.
"""
import importlib
import math
import os
from typing import Optional

import torch
from torch import Tensor

from erpo.ops import row_stats, vocab_parallel
from erpo.ops.logprobs_entropy import (FLOAT_DTYPES, _check_target_range, _flat_targets, check_plain_for_support,
                                       check_support_args, full_support)
from erpo.ops.row_layout import row_layout

LINEAR_BACKENDS = ("auto", "torch", "triton")


def resolve_backend(backend: str) -> str:
    if backend not in LINEAR_BACKENDS:
        raise ValueError(f"the fused head's backend must be one of {LINEAR_BACKENDS}, got {backend!r}")
    return "torch" if backend == "auto" else backend


def load(backend: str):
    if backend == "torch":
        return importlib.import_module("erpo.ops.torch_linear_logprobs_entropy")
    return importlib.import_module("erpo.kernels.linear_logprobs_entropy")


def _check_available(backend: str, is_cuda: bool) -> None:
    if backend != "triton":
        return
    if not is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "backend='triton' on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 in the "
            "environment before erpo (and triton) are imported, or use backend='torch'"
        )
    try:
        load("triton")
    except ImportError as err:
        raise RuntimeError(f"backend='triton': the fused-head kernel module is not importable ({err}); "
                           "use backend='torch'") from err


@torch.library.custom_op("erpo::linear_logprobs_entropy_fwd", mutates_args=())
def _fwd_op(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, inv_temperature: float,
    ignore_index: int, backend: str, check_targets: bool, logit_scale: float = 1.0, softcap: Optional[float] = None,
    head_fp32: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    flat_targets = _flat_targets(targets)
    if check_targets:
        _check_target_range(flat_targets, weight.shape[0], ignore_index)
    logp, entropy, lse = load(backend).forward(
        row_layout(hidden), weight, bias, flat_targets, inv_temperature, ignore_index,
        **head_kwargs(logit_scale, softcap, head_fp32)
    )
    shape = targets.shape
    return logp.view(shape), entropy.view(shape), lse.view(shape)


@_fwd_op.register_fake
def _(hidden, weight, bias, targets, inv_temperature, ignore_index, backend, check_targets, logit_scale=1.0,
      softcap=None, head_fp32=False):
    make = lambda: hidden.new_empty(targets.shape, dtype=torch.float32)  # noqa: E731
    return make(), make(), make()


@torch.library.custom_op("erpo::linear_logprobs_entropy_bwd", mutates_args=())
def _bwd_op(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, lse: Tensor, entropy: Tensor,
    grad_logp: Optional[Tensor], grad_entropy: Optional[Tensor], inv_temperature: float, ignore_index: int,
    backend: str, logit_scale: float = 1.0, softcap: Optional[float] = None, head_fp32: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    def flat(values):
        return None if values is None else values.reshape(-1).to(torch.float32).contiguous()

    grad_hidden, grad_weight, grad_bias = load(backend).backward(
        row_layout(hidden), weight, bias, _flat_targets(targets), flat(lse), flat(entropy), flat(grad_logp),
        flat(grad_entropy), inv_temperature, ignore_index, **head_kwargs(logit_scale, softcap, head_fp32),
    )
    # A custom op returns tensors only: no bias gives an empty grad_bias.
    grad_bias = grad_weight.new_empty(0) if grad_bias is None else grad_bias
    return grad_hidden.view(hidden.shape), grad_weight, grad_bias


@_bwd_op.register_fake
def _(hidden, weight, bias, targets, lse, entropy, grad_logp, grad_entropy, inv_temperature, ignore_index, backend,
      logit_scale=1.0, softcap=None, head_fp32=False):
    grad_bias = weight.new_empty((0,) if bias is None else (weight.shape[0],), dtype=torch.float32)
    return (hidden.new_empty(hidden.shape, dtype=torch.float32), weight.new_empty(weight.shape, dtype=torch.float32),
            grad_bias)


def head_kwargs(logit_scale: float, softcap: Optional[float], head_fp32: bool) -> dict:
    """The backends' keywords for a head that is not plain (none for the plain head: its calls are unchanged)."""
    kwargs = {} if softcap is None and logit_scale == 1.0 else {"logit_scale": logit_scale, "softcap": softcap}
    return {**kwargs, "head_fp32": True} if head_fp32 else kwargs


class LinearLogprobsEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, inv_temperature, ignore_index, backend, check_targets,
                logit_scale=1.0, softcap=None, head_fp32=False):
        logp, entropy, lse = _fwd_op(hidden, weight, bias, targets, inv_temperature, ignore_index, backend,
                                     check_targets, logit_scale, softcap, head_fp32)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.inv_temperature, ctx.ignore_index, ctx.backend = inv_temperature, ignore_index, backend
        ctx.head = (logit_scale, softcap, head_fp32)
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        return _head_grads(ctx, grad_logp, grad_entropy) + (None,) * 8


def _head_grads(ctx, grad_logp, grad_entropy, group=None) -> tuple:
    """(grad_hidden, grad_weight, grad_bias) of the saved head, each None where not needed; with a vocabulary-
    parallel `group`, grad_hidden (a sum over the whole vocabulary) is all-reduced in float32 before the cast."""
    hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
    if grad_logp is None and grad_entropy is None:
        return None, None, None
    grad_hidden, grad_weight, grad_bias = _bwd_op(
        hidden, weight, bias, targets, lse, entropy, grad_logp, grad_entropy, ctx.inv_temperature,
        ctx.ignore_index, ctx.backend, *ctx.head,
    )
    needs = ctx.needs_input_grad
    if needs[0] and group is not None:
        grad_hidden = vocab_parallel.all_reduce_sum(grad_hidden, group)
    return (
        grad_hidden.to(hidden.dtype) if needs[0] else None,
        grad_weight.to(weight.dtype) if needs[1] else None,
        grad_bias.to(bias.dtype) if bias is not None and needs[2] else None,
    )


def _vocab_parallel_forward(hidden, weight, bias, targets, inv_temperature, ignore_index, backend, check_targets,
                            group, vocab_size, logit_scale=1.0, softcap=None, head_fp32=False):
    """(logp, entropy, lse, local targets) of this rank's head slice merged over the group (vocab_parallel.py)."""
    local_vocab = weight.shape[0]
    offset, total = vocab_parallel.shard_offset(local_vocab, group, hidden.device, vocab_size)
    if check_targets:
        _check_target_range(_flat_targets(targets), total, ignore_index)
    local = vocab_parallel.local_targets(targets, offset, local_vocab, ignore_index)
    logp_r, entropy_r, lse_r = _fwd_op(hidden, weight, bias, local, inv_temperature, ignore_index, backend, False,
                                       logit_scale, softcap, head_fp32)
    logp, entropy, lse = vocab_parallel.merge(logp_r.reshape(-1), entropy_r.reshape(-1), lse_r.reshape(-1),
                                              local.reshape(-1), local_vocab, ignore_index, group)
    shape = targets.shape
    return logp.view(shape), entropy.view(shape), lse.view(shape), local


class VocabParallelLinearFunction(torch.autograd.Function):
    """The fused head on this rank's slice of weight/bias; grad_weight/grad_bias stay local, grad_hidden (a sum
    over the whole vocabulary) is all-reduced over the group."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, inv_temperature, ignore_index, backend, check_targets, group,
                vocab_size, logit_scale=1.0, softcap=None, head_fp32=False):
        logp, entropy, lse, local = _vocab_parallel_forward(
            hidden, weight, bias, targets, inv_temperature, ignore_index, backend, check_targets, group, vocab_size,
            logit_scale, softcap, head_fp32)
        ctx.save_for_backward(hidden, weight, bias, local, lse, entropy)
        ctx.inv_temperature, ctx.ignore_index, ctx.backend, ctx.group = inv_temperature, ignore_index, backend, group
        ctx.head = (logit_scale, softcap, head_fp32)
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        return _head_grads(ctx, grad_logp, grad_entropy, ctx.group) + (None,) * 10


def _tensor(name: str, value) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(value).__name__}")
    return value


def validate(hidden, weight, targets, bias, temperature, backend, logit_scale=1.0, softcap=None,
             head_fp32=False) -> str:
    """Every check of the fused head's inputs, before any kernel runs; returns the resolved backend."""
    hidden, weight, targets = _tensor("hidden", hidden), _tensor("weight", weight), _tensor("targets", targets)
    if bias is not None:
        _tensor("bias", bias)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [V, H] (the nn.Linear layout), got shape {tuple(weight.shape)}")
    vocab, hidden_size = weight.shape
    if vocab < 1 or hidden_size < 1:
        raise ValueError(f"weight must be [V, H] with V >= 1 and H >= 1, got shape {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != hidden_size:
        raise ValueError(
            f"hidden's last dim must be the head's H = {hidden_size} (weight {tuple(weight.shape)}), "
            f"got hidden of shape {tuple(hidden.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (vocab,):
        raise ValueError(f"bias must be [V] = ({vocab},) to match weight {tuple(weight.shape)}, got {tuple(bias.shape)}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(
            f"targets shape {tuple(targets.shape)} must equal hidden's shape without H {tuple(hidden.shape[:-1])}"
        )
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"targets must hold integer token ids, got dtype {targets.dtype}")
    for name, tensor in (("weight", weight), ("targets", targets), ("bias", bias)):
        if tensor is not None and tensor.device != hidden.device:
            raise ValueError(f"hidden is on {hidden.device} but {name} on {tensor.device}")
    if hidden.dtype not in FLOAT_DTYPES:
        raise TypeError(f"hidden dtype {hidden.dtype} is not supported; supported: "
                        f"{', '.join(str(d) for d in FLOAT_DTYPES)}")
    if not isinstance(head_fp32, bool):
        raise TypeError(f"head_fp32 must be True or False, got {type(head_fp32).__name__}")
    for name, tensor in (("weight", weight), ("bias", bias)):
        if tensor is not None and tensor.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} dtype {tensor.dtype} is not supported; supported: "
                            f"{', '.join(str(d) for d in FLOAT_DTYPES)}")
        if tensor is not None and tensor.dtype != hidden.dtype and not head_fp32:
            raise TypeError(f"{name} dtype {tensor.dtype} differs from hidden's {hidden.dtype}; cast one of them "
                            "(or pass head_fp32=True: the head then computes in float32 from any mix)")
    if bias is not None and bias.dtype != weight.dtype:
        raise TypeError(f"bias dtype {bias.dtype} differs from weight's {weight.dtype}; cast one of them")
    row_stats.check_logit_transform(logit_scale, softcap)
    if isinstance(temperature, Tensor) or isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a Python number, got {type(temperature).__name__}")
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    resolved = resolve_backend(backend)
    _check_available(resolved, hidden.is_cuda)
    return resolved


def head_transform_from_config(config) -> dict:
    """{"softcap": ..., "logit_scale": ...} of a Hugging Face model config, read as TRL 1.16 reads them
    (trl/trainer/utils.py add_fused_lm_head): the text config's `final_logit_softcapping` (Gemma 2/3) and its
    logit multiplier, the first set of `logit_scale` (Cohere), `output_multiplier`, `lm_head_multiplier`
    (Falcon-H1), or 1 / `logits_scaling` (Granite, MiniCPM3; HyperCLOVA X multiplies by it); absent: the plain
    head (None, 1.0)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = getattr(text, "final_logit_softcapping", None)
    scale = None
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        scale = getattr(text, name, None)
        if scale is not None:
            break
    scaling = getattr(text, "logits_scaling", None)
    if scale is None and scaling is not None:
        scale = scaling if getattr(text, "model_type", None) == "hyperclovax" else 1 / scaling
    return {"softcap": None if softcap is None else float(softcap),
            "logit_scale": 1.0 if scale is None else float(scale)}


def linear_logprobs_and_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Optional[Tensor] = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    backend: str = "auto",
    check_targets: bool = True,
    process_group=None,
    vocab_size: Optional[int] = None,
    support=None,
    support_ids: Optional[Tensor] = None,
    softcap: Optional[float] = None,
    logit_scale: float = 1.0,
    head_fp32: bool = False,
) -> tuple[Tensor, Tensor]:
    """Per-token log-prob of `targets` and entropy of softmax((hidden @ weight.T + bias) / temperature).

    Args:
        hidden: `[..., H]` bf16, fp16 or fp32; rows may be strided (e.g. `hidden_states[:, :-1]`): read in place.
        weight: `[V, H]` (nn.Linear / `get_output_embeddings().weight` layout, tied embeddings included), same
            dtype as hidden. bias: optional `[V]`, same dtype.
        targets: integer ids `[...]` = hidden.shape[:-1]; `ignore_index` rows give 0 and no gradient, and are
            not computed.
        backend: "auto" (= "torch"), "torch" or "triton".
        check_targets: validate target ids are in [0, V) (one host sync); False on a hot path of known-good ids.
        process_group: a torch.distributed group over which the head is sharded by vocabulary: `weight` [V_r, H]
            and `bias` [V_r] are this rank's contiguous slice (ranks in order, uneven slices allowed); hidden
            and the global target ids are the same on every rank. Outputs are those of the whole vocabulary;
            grad_weight/grad_bias stay per slice, grad_hidden is all-reduced over the group (so do not also
            all-reduce it upstream). One all_gather in the forward, one all_reduce in the backward.
        vocab_size: the whole vocabulary, checked against the sum of the slices (or against V without a group).
        support, support_ids: score against the sampler's truncated support S, recomputed (`erpo.Support`) or
            replayed (`[..., K]` kept ids, -1 padded), as `logprobs_and_entropy` does (torch backend).
        softcap, logit_scale: the model's final logit soft-capping c and logit scale s (Gemma 2/3's
            `final_logit_softcapping`, Cohere's `logit_scale`): the softmax is that of c tanh(s y / c) / T
            (s y / T without a cap), y = hidden @ weight.T + bias, applied to each logits tile in the head, forward
            and backward (as `logprobs_and_entropy` does). Defaults (None, 1.0) are the plain head, bit for bit.
        head_fp32: compute the head in float32 from 16-bit inputs (TRL's `cast_lm_head_to_fp32`, vLLM's
            `head_dtype=float32`): the logits are fp32 products of the upcast hidden rows and weight rows, and the
            gradient products take fp32 dlogits, the weight upcast a slice (torch) or a tile (Triton) at a time,
            never a full fp32 copy of it. Hidden and weight may then differ in dtype (e.g. a bf16 backbone and an
            fp32 head, as TRL's cast leaves them); each gradient comes back in its input's dtype.

    Returns:
        (logp, entropy), float32 shaped like targets, differentiable w.r.t. hidden, weight and bias.
        Never holds [N, V]; under no_grad (old/ref log-probs) only the forward runs and nothing is saved.
    """
    if support_ids is not None or (support is not None and not full_support(support, weight.shape[0])):
        row_stats.check_logit_transform(logit_scale, softcap)
        check_plain_for_support(logit_scale, softcap, bool(head_fp32))
        return _on_support(hidden, weight, targets, bias, temperature, ignore_index, backend, check_targets,
                           process_group, support, support_ids)
    resolved = validate(hidden, weight, targets, bias, temperature, backend, logit_scale, softcap, head_fp32)
    head = (float(logit_scale), None if softcap is None else float(softcap), head_fp32)
    weight = weight.contiguous()
    inv_temperature = 1.0 / float(temperature)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias)
    )
    if process_group is not None:
        vocab_parallel.check_group(process_group)
        if needs_grad:
            return VocabParallelLinearFunction.apply(hidden, weight, bias, targets, inv_temperature, ignore_index,
                                                     resolved, check_targets, process_group, vocab_size, *head)
        logp, entropy, _, _ = _vocab_parallel_forward(hidden, weight, bias, targets, inv_temperature, ignore_index,
                                                      resolved, check_targets, process_group, vocab_size, *head)
        return logp, entropy
    if vocab_size is not None and vocab_size != weight.shape[0]:
        raise ValueError(f"vocab_size={vocab_size} but the head weight holds V = {weight.shape[0]} rows "
                         "(no process_group)")
    if needs_grad:
        return LinearLogprobsEntropyFunction.apply(
            hidden, weight, bias, targets, inv_temperature, ignore_index, resolved, check_targets, *head
        )
    logp, entropy, _ = _fwd_op(hidden, weight, bias, targets, inv_temperature, ignore_index, resolved, check_targets,
                               *head)
    return logp, entropy


def _on_support(hidden, weight, targets, bias, temperature, ignore_index, backend, check_targets, process_group,
                support, support_ids):
    from erpo.ops.support_logprobs_entropy import replay_linear_logprobs_and_entropy, support_linear_logprobs_and_entropy

    check_support_args(support, support_ids, backend if backend != "auto" else "torch", False, process_group)
    validate(hidden, weight, targets, bias, temperature, "torch")
    if check_targets:
        _check_target_range(_flat_targets(targets), weight.shape[0], ignore_index)
    if support_ids is not None:  # only the kept rows of the head are ever multiplied
        return replay_linear_logprobs_and_entropy(hidden, weight.contiguous(), bias, targets, 1.0 / float(temperature),
                                                  ignore_index, support_ids, check_targets)
    result = support_linear_logprobs_and_entropy(hidden, weight.contiguous(), bias, targets, 1.0 / float(temperature),
                                                 ignore_index, support, support_ids, check_targets)
    return result.logp, result.entropy
