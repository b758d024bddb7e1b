"""backend='cuda': the CUDA C++ kernels of csrc/, bound to torch by the optional extension `erpo._C`.

Same two functions and semantics as the torch and triton backends (see erpo.ops.backends). The kernels read
the rows of `layout.tensor` in place through its two row strides (no copy of strided views) and write flat
float32 outputs; the backward writes the gradient at `grad_layout`'s strides, which may be the logits' own.
"""
import torch

# Threads per block (one row per block); 0 lets the launcher choose from the vocabulary size and dtype
# (csrc/softmax_row_math.h: default_block_threads). A multiple of 32 in [32, 512] overrides it, for tuning.
BLOCK_THREADS = 0


def _extension():
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
        from erpo import _C  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def _per_row(tensor):
    return None if tensor is None else tensor.reshape(-1).to(torch.float32).contiguous()


def forward(layout, targets, inv_temperature, ignore_index):
    """Flat float32 (logp, entropy, lse), each [N], for the rows described by `layout` (a RowLayout)."""
    ext = _extension()
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


def backward(layout, targets, lse, entropy, grad_logp, grad_entropy, inv_temperature, ignore_index, grad_layout):
    """Write dlogits into grad_layout.tensor (which may be layout.tensor itself: the in-place gradient)."""
    ext = _extension()
    if not layout.n_rows:
        return
    ext.logprobs_entropy_bwd(
        layout.tensor, layout.stride_outer, layout.stride_inner, layout.inner,
        grad_layout.tensor, grad_layout.stride_outer, grad_layout.stride_inner,
        targets, _per_row(lse), _per_row(entropy), _per_row(grad_logp), _per_row(grad_entropy),
        layout.n_rows, layout.vocab, float(inv_temperature), int(ignore_index), BLOCK_THREADS,
    )


EXTRA_NAMES = ("log_ratio", "seq_coef", "eps_low", "eps_high", "kl_weight", "pg_weight")  # TokenExtras, in order


def token_kernel_args(logp, entropy, old, adv, ref, klcov_w, params, extras=None):
    """The per-token kernel's (12 arrays, 11 float scalars, 6 int codes) in csrc/policy_loss_token.h's order
    (the host shim's too); an absent array is None."""
    arrays = [logp, entropy, old, adv, ref, klcov_w, *(getattr(extras, name, None) for name in EXTRA_NAMES)]
    scalars = [float(x) for x in (
        params.eps_low, params.eps_high, 1.0 - params.eps_low, 1.0 + params.eps_high, params.dual_clip_c,
        params.kl_coef, params.entropy_coef, 0.0 if params.delta is None else params.delta, params.cispo_max,
        params.sapo_tau_pos, params.sapo_tau_neg)]
    codes = [params.objective_code, int(params.dual_clip), int(params.delta is not None),
             int(params.cispo_clip == "upper"), params.kl_code, int(params.kl_bias_correction)]
    return arrays, scalars, codes


def token_terms(logp, entropy, old, adv, ref, klcov_w, params, extras=None):
    """The per-token loss terms on csrc/policy_loss_token.cu: the same contract as kernels/policy_loss.py."""
    ext, n = _extension(), logp.numel()
    arrays, _, _ = token_kernel_args(logp, entropy, old, adv, ref, klcov_w, params, extras)
    arrays = [None if t is None else t.reshape(-1).float().contiguous() for t in arrays]
    out = [torch.empty(n, dtype=torch.float32, device=logp.device) for _ in range(3)]
    flags = [torch.empty(n, dtype=torch.bool, device=logp.device) for _ in range(2)]
    if n:
        ext.policy_loss_token(
            *arrays, *out, *flags, params.eps_low, params.eps_high, params.dual_clip_c, params.kl_coef,
            params.entropy_coef, params.delta, params.cispo_max, params.sapo_tau_pos, params.sapo_tau_neg,
            params.objective_code, params.dual_clip, params.cispo_clip == "upper", params.kl_code,
            params.kl_bias_correction,
        )
    return (*out, *flags)

