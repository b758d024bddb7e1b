"""backend='cuda': the CUDA C++ kernels of csrc/, bound to torch by the optional extension `erpo._C`.

Same two functions and semantics as the torch and triton backends (see erpo.ops.backends). The kernels read
the rows of `layout.tensor` in place through its two row strides (no copy of strided views) and write flat
float32 outputs; the backward writes the gradient at `grad_layout`'s strides, which may be the logits' own.
"""
import torch

# Threads per block (one row per block); 0 lets the launcher choose from the vocabulary size and dtype
# (csrc/softmax_row_math.h: default_block_threads). A multiple of 32 in [32, 512] overrides it, for tuning.
BLOCK_THREADS = 0


def extension():
    try:
        from erpo import _C
    except ImportError as err:
        raise RuntimeError(
            "backend='cuda' needs erpo's CUDA extension, which is not built in this install. Build it on a "
            "machine with a CUDA build of torch and nvcc: `ERPO_BUILD_CUDA=1 pip install -e . --no-build-isolation`"
        ) from err
    return _C


def is_available() -> bool:
    """True where the extension is built and a CUDA device is present."""
    try:
        extension()
    except RuntimeError:
        return False
    return torch.cuda.is_available()


def _per_row(tensor):
    return None if tensor is None else tensor.reshape(-1).to(torch.float32).contiguous()


def _plain_head_only(logit_scale, softcap) -> None:
    if softcap is not None or logit_scale != 1.0:
        raise ValueError("backend='cuda' does not implement softcap/logit_scale; use backend='triton' or 'torch'")


def forward(layout, targets, inv_temperature, ignore_index, logit_scale=1.0, softcap=None):
    """Flat float32 (logp, entropy, lse), each [N], for the rows described by `layout` (a RowLayout)."""
    _plain_head_only(logit_scale, softcap)
    ext = extension()
    logits = layout.tensor
    logp = torch.empty(layout.n_rows, dtype=torch.float32, device=logits.device)
    entropy = torch.empty_like(logp)
    lse = torch.empty_like(logp)
    if layout.n_rows:
        ext.logprobs_entropy_fwd(
            logits, layout.stride_outer, layout.stride_inner, layout.inner, targets,
            logp, entropy, lse, layout.n_rows, layout.vocab, float(inv_temperature), int(ignore_index), BLOCK_THREADS,
        )
    return logp, entropy, lse


def backward(layout, targets, lse, entropy, grad_logp, grad_entropy, inv_temperature, ignore_index, grad_layout,
             logit_scale=1.0, softcap=None):
    """Write dlogits into grad_layout.tensor (which may be layout.tensor itself: the in-place gradient)."""
    _plain_head_only(logit_scale, softcap)
    ext = extension()
    if not layout.n_rows:
        return
    ext.logprobs_entropy_bwd(
        layout.tensor, layout.stride_outer, layout.stride_inner, layout.inner,
        grad_layout.tensor, grad_layout.stride_outer, grad_layout.stride_inner,
        targets, _per_row(lse), _per_row(entropy), _per_row(grad_logp), _per_row(grad_entropy),
        layout.n_rows, layout.vocab, float(inv_temperature), int(ignore_index), BLOCK_THREADS,
    )


# The per-token loss binding moved to cuda_token_loss.py (names kept until erpo/losses/token_loss.py imports it).
from erpo.ops.cuda_token_loss import token_kernel_args, token_terms  # noqa: E402,F401
