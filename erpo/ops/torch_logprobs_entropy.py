"""Chunked pure-torch backend of the fused op: the CPU path and the reference the kernels are tested against.

Memory plan: rows are processed in chunks of at most CHUNK_ELEMENTS elements (4 MiB in float32) with two
chunk-sized float32 buffers reused in place, so the temporaries stay near 10 MiB however large `[N, V]` is.
Chunks are views of the logits (never a copy of the whole tensor, also for strided rows). The forward keeps
per row only lse and entropy; the backward recomputes p from them and writes the gradient chunk by chunk into
one buffer in the logits' dtype (or into the logits themselves). Accumulation is float32, float64 for float64 logits.

Speed: eagerly, each chunk costs about ten elementwise passes (one torch op each), which makes the backend
pass-bound on CPU. On large CPU inputs the two per-chunk bodies run through `torch.compile` instead
(erpo/ops/torch_chunk_bodies.py), which fuses each into one or two loops over the chunk; same formulas,
same memory plan, eager fallback.
"""
import torch

from erpo.ops import row_stats
from erpo.ops import torch_chunk_bodies as chunk_bodies
from erpo.ops.row_layout import RowLayout

CHUNK_ELEMENTS = 1 << 20


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunks(layout: RowLayout, tensor: torch.Tensor):
    """Yield (flat_row_slice, view) with view of shape [rows, V] or [k, inner, V], rows in flat order."""
    if layout.n_rows == 0:
        return
    vocab, inner = layout.vocab, layout.inner
    outer = layout.n_rows // inner
    rows3d = torch.as_strided(tensor, (outer, inner, vocab), (layout.stride_outer, layout.stride_inner, 1))
    step = max(1, CHUNK_ELEMENTS // max(vocab, 1))
    if inner >= step:
        for o in range(outer):
            for i in range(0, inner, step):
                j = min(i + step, inner)
                yield slice(o * inner + i, o * inner + j), rows3d[o, i:j]
    else:
        per = max(1, step // inner)
        for o in range(0, outer, per):
            p = min(o + per, outer)
            yield slice(o * inner, p * inner), rows3d[o:p]


def _forward_rows(chunk: torch.Tensor, tgt: torch.Tensor, inv_temperature: float, ignore_index: int):
    """(logp, entropy, lse) of the rows of one chunk, shaped chunk.shape[:-1] (row_stats.py)."""
    cdt = _compute_dtype(chunk.dtype)
    ignored = tgt == ignore_index
    hit = row_stats.holds_target(tgt, ignored, chunk.shape[-1])
    x = chunk.to(cdt, copy=True).mul_(inv_temperature)  # the one chunk-sized buffer besides e
    target_x = x.gather(-1, torch.where(hit, tgt, 0).long().unsqueeze(-1)).squeeze(-1)
    row_logp, row_entropy, row_lse = row_stats.finish(row_stats.of_rows(x), target_x)
    zero = torch.zeros_like(row_lse)
    row_logp = torch.where(hit, row_logp, torch.full_like(row_lse, float("nan")))
    return torch.where(ignored, zero, row_logp), torch.where(ignored, zero, row_entropy), row_lse


def _backward_rows(chunk, out, tgt, row_lse, row_entropy, g_logp, g_ent, inv_temperature: float, ignore_index: int):
    """Write the gradient of one chunk's rows into `out` (which may be `chunk` itself: the in-place gradient).
    Per-row values come shaped chunk.shape[:-1] + (1,)."""
    ignored = tgt == ignore_index
    log_p = chunk.to(_compute_dtype(chunk.dtype), copy=True).mul_(inv_temperature).sub_(row_lse)
    p = torch.exp(log_p)
    # x - E_p[x] = log p + H (E_p[x] = lse - H): an exact shift of log p, clamped as row_stats.grad_into wants.
    grad = row_stats.grad_into(log_p.clamp_(min=row_stats.FLOOR), p, 1.0, row_entropy, g_logp, g_ent, tgt,
                               row_stats.holds_target(tgt, ignored, chunk.shape[-1]))
    out.copy_(grad.mul_(inv_temperature).masked_fill_(ignored.unsqueeze(-1), 0.0))


def forward(layout: RowLayout, targets: torch.Tensor, inv_temperature: float, ignore_index: int):
    """Return flat (logp, entropy, lse), each [N], float32 (float64 for float64 logits)."""
    logits = layout.tensor
    cdt = _compute_dtype(logits.dtype)
    logp = torch.empty(layout.n_rows, dtype=cdt, device=logits.device)
    entropy = torch.empty_like(logp)
    lse = torch.empty_like(logp)
    rows_fn = chunk_bodies.pick(_forward_rows, layout, logits)
    for rows, chunk in _chunks(layout, logits):
        row_logp, row_entropy, row_lse = rows_fn(chunk, targets[rows].view(chunk.shape[:-1]), inv_temperature,
                                                 ignore_index)
        logp[rows] = row_logp.reshape(-1)
        entropy[rows] = row_entropy.reshape(-1)
        lse[rows] = row_lse.reshape(-1)
    return logp, entropy, lse


def backward(
    layout: RowLayout,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    grad_logp,
    grad_entropy,
    inv_temperature: float,
    ignore_index: int,
    grad_layout: RowLayout,
) -> None:
    """Write dlogits = (g_logp (onehot - p) - g_ent p (x - E_p[x])) / T into grad_layout.tensor."""
    logits = layout.tensor
    cdt = _compute_dtype(logits.dtype)
    rows_fn = chunk_bodies.pick(_backward_rows, layout, logits)
    out_chunks = _chunks(grad_layout, grad_layout.tensor)
    for (rows, chunk), (_, out) in zip(_chunks(layout, logits), out_chunks):
        shape = chunk.shape[:-1]

        def per_row(values):
            return None if values is None else values[rows].to(cdt).view(shape).unsqueeze(-1)

        # The in-place gradient passes the chunk once: a compiled body then sees one tensor, not two aliases.
        rows_fn(chunk, chunk if out.data_ptr() == chunk.data_ptr() else out, targets[rows].view(shape),
                per_row(lse), per_row(entropy), per_row(grad_logp), per_row(grad_entropy), inv_temperature,
                ignore_index)
