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
import math
from typing import Optional

import torch

from erpo.ops import row_stats
from erpo.ops import torch_chunk_bodies as chunk_bodies
from erpo.ops.row_layout import RowLayout

CHUNK_ELEMENTS = 1 << 20


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def row_chunks(layout: RowLayout, tensor: torch.Tensor, elements: Optional[int] = None):
    """Yield (flat_row_slice, view) with view of shape [rows, V] or [k, inner, V], rows in flat order, about
    `elements` logits per chunk (default CHUNK_ELEMENTS; views of the tensor, never a copy)."""
    if layout.n_rows == 0:
        return
    vocab, inner = layout.vocab, layout.inner
    outer = layout.n_rows // inner
    rows3d = torch.as_strided(tensor, (outer, inner, vocab), (layout.stride_outer, layout.stride_inner, 1))
    step = max(1, (elements or CHUNK_ELEMENTS) // max(vocab, 1))
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


def _forward_rows(chunk: torch.Tensor, tgt: torch.Tensor, tr: row_stats.LogitTransform, ignore_index: int):
    """(logp, entropy, lse) of the rows of one chunk, shaped chunk.shape[:-1] (row_stats.py)."""
    cdt = _compute_dtype(chunk.dtype)
    ignored = tgt == ignore_index
    hit = row_stats.holds_target(tgt, ignored, chunk.shape[-1])
    x = chunk.to(cdt, copy=True)  # the one chunk-sized buffer besides e (and, under a soft cap, f')
    row_stats.transform_(x, tr, want_slope=False)
    target_x = x.gather(-1, torch.where(hit, tgt, 0).long().unsqueeze(-1)).squeeze(-1)
    row_logp, row_entropy, row_lse = row_stats.finish(row_stats.of_rows(x), target_x)
    zero = torch.zeros_like(row_lse)
    row_logp = torch.where(hit, row_logp, torch.full_like(row_lse, float("nan")))
    return torch.where(ignored, zero, row_logp), torch.where(ignored, zero, row_entropy), row_lse


def _backward_rows(chunk, out, tgt, row_lse, row_entropy, g_logp, g_ent, tr: row_stats.LogitTransform,
                   ignore_index: int):
    """Write the gradient of one chunk's rows into `out` (which may be `chunk` itself: the in-place gradient).
    Per-row values come shaped chunk.shape[:-1] + (1,)."""
    ignored = tgt == ignore_index
    log_p = chunk.to(_compute_dtype(chunk.dtype), copy=True)
    slope = row_stats.transform_(log_p, tr)
    log_p.sub_(row_lse)
    p = torch.exp(log_p)
    # x - E_p[x] = log p + H (E_p[x] = lse - H): an exact shift of log p, clamped as row_stats.grad_into wants.
    grad = row_stats.grad_into(log_p.clamp_(min=row_stats.FLOOR), p, 1.0, row_entropy, g_logp, g_ent, tgt,
                               row_stats.holds_target(tgt, ignored, chunk.shape[-1]))
    out.copy_(row_stats.transform_grad_(grad, tr, slope).masked_fill_(ignored.unsqueeze(-1), 0.0))


def forward(layout: RowLayout, targets: torch.Tensor, inv_temperature: float, ignore_index: int,
            logit_scale: float = 1.0, softcap=None):
    """Return flat (logp, entropy, lse), each [N], float32 (float64 for float64 logits), of softmax(x) with x the
    logits through row_stats.logit_transform (scale, soft cap, temperature)."""
    tr = row_stats.logit_transform(inv_temperature, logit_scale, softcap)
    logits = layout.tensor
    cdt = _compute_dtype(logits.dtype)
    logp = torch.empty(layout.n_rows, dtype=cdt, device=logits.device)
    entropy = torch.empty_like(logp)
    lse = torch.empty_like(logp)
    rows_fn = chunk_bodies.pick(_forward_rows, layout, logits)
    for rows, chunk in row_chunks(layout, logits):
        row_logp, row_entropy, row_lse = rows_fn(chunk, targets[rows].view(chunk.shape[:-1]), tr, ignore_index)
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
    logit_scale: float = 1.0,
    softcap=None,
) -> None:
    """Write dlogits = (g_logp (onehot - p) - g_ent p (x - E_p[x])) dx/dlogits into grad_layout.tensor (dx/dlogits
    = 1 / T for the plain head; row_stats.transform_grad_)."""
    tr = row_stats.logit_transform(inv_temperature, logit_scale, softcap)
    logits = layout.tensor
    cdt = _compute_dtype(logits.dtype)
    rows_fn = chunk_bodies.pick(_backward_rows, layout, logits)
    out_chunks = row_chunks(grad_layout, grad_layout.tensor)
    for (rows, chunk), (_, out) in zip(row_chunks(layout, logits), out_chunks):
        shape = chunk.shape[:-1]

        def per_row(values):
            return None if values is None else values[rows].to(cdt).view(shape).unsqueeze(-1)

        # The in-place gradient passes the chunk once: a compiled body then sees one tensor, not two aliases.
        rows_fn(chunk, chunk if out.data_ptr() == chunk.data_ptr() else out, targets[rows].view(shape),
                per_row(lse), per_row(entropy), per_row(grad_logp), per_row(grad_entropy), tr, ignore_index)


def _support_chunks(layout: RowLayout, targets, ids, ignore_index):
    """(rows, chunk [r, V], tgt [r], ignored, hit, ids [r, K] or None) over the layout, 2-D chunks."""
    for rows, chunk in row_chunks(layout, layout.tensor):
        chunk = chunk.reshape(-1, chunk.shape[-1])
        tgt = targets[rows].long()
        ignored = tgt == ignore_index
        hit = row_stats.holds_target(tgt, ignored, chunk.shape[-1])
        yield rows, chunk, torch.where(hit, tgt, 0), ignored, hit, None if ids is None else ids[rows]


def forward_support(layout: RowLayout, targets, inv_temperature: float, ignore_index: int, support, ids):
    """Flat [N] (logp, H, lse) over S, the same over the whole row, tau (recompute; NaN in replay), |S| and
    whether the target was added to S, from one read of each chunk: S = threshold(support) or the ids
    (erpo/ops/support.py)."""
    from erpo.ops import support as support_lib

    cdt = _compute_dtype(layout.tensor.dtype)
    out = [torch.zeros(layout.n_rows, dtype=cdt, device=layout.tensor.device) for _ in range(9)]
    for rows, chunk, tgt, ignored, hit, row_ids in _support_chunks(layout, targets, ids, ignore_index):
        z = chunk.to(cdt, copy=True).mul_(inv_temperature)
        tau = support_lib.threshold(z, support) if row_ids is None else torch.full_like(z[:, 0], math.nan)
        keep = support_lib.kept(z, tgt, hit, tau if row_ids is None else None, row_ids)
        target_z = z.gather(1, tgt.unsqueeze(1)).squeeze(1)
        (logp_f, h_f, lse_f), (logp_s, h_s, lse_s) = support_lib.forward_rows(z, target_z, keep)
        nan = torch.full_like(logp_f, math.nan)
        values = [torch.where(hit, logp_s, nan), h_s, lse_s, torch.where(hit, logp_f, nan), h_f, lse_f, tau,
                  *support_lib.row_counts(keep, target_z, tau)]
        for column, value in zip(out, values):
            column[rows] = value.masked_fill(ignored, 0.0)
    return tuple(out)


def backward_support(layout: RowLayout, targets, saved, grads, inv_temperature: float, ignore_index: int, ids,
                     grad_layout: RowLayout) -> None:
    """dlogits for the gradients (g_logp_S, g_H_S, g_logp, g_H) of forward_support's outputs, written into
    grad_layout.tensor; `saved` = (lse_S, H_S, lse, H, tau)."""
    from erpo.ops import support as support_lib

    cdt = _compute_dtype(layout.tensor.dtype)
    outs = (out.reshape(-1, out.shape[-1]) for _, out in row_chunks(grad_layout, grad_layout.tensor))
    for (rows, chunk, tgt, ignored, hit, row_ids), out in zip(_support_chunks(layout, targets, ids, ignore_index), outs):
        def per_row(values):
            return None if values is None else values[rows].to(cdt).masked_fill(ignored, 0.0).unsqueeze(-1)

        z = chunk.to(cdt, copy=True).mul_(inv_temperature)
        lse_s, h_s, lse_f, h_f, tau = (per_row(v) for v in saved)
        keep = support_lib.kept(z, tgt, hit, None if row_ids is not None else tau.squeeze(-1), row_ids)
        g = [per_row(v) for v in grads]
        dz = support_lib.backward_rows(z, keep, tgt, hit, (lse_f, h_f), (lse_s, h_s), (g[2], g[3]), (g[0], g[1]))
        out.copy_(dz.mul_(inv_temperature).masked_fill_(ignored.unsqueeze(-1), 0.0))
