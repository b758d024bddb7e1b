"""Chunked pure-torch backend of the fused LM head: (hidden, weight, bias) -> logp, entropy, lse and back.

Memory plan: hidden rows are processed in chunks of R rows against the whole vocabulary. Two [R, V] float32
buffers, allocated once per call, hold a chunk's logits and their exponentials (rewritten in place into
dlogits), plus an [R, H] copy of the chunk's hidden rows; R is the largest count whose [R, V] float32 buffer fits
BUDGET_BYTES[device type] (8 MiB on CPU, 256 MiB on CUDA), so the temporaries never grow with N and never
hold [N, V]. The only full-size results are the gradients: grad_hidden [N, H] and grad_weight [V, H] in
float32 (grad_bias [V]). bf16/fp16 heads: the logits matmul runs in the weights' dtype (fp32 accumulation in
the BLAS, as `hidden @ weight.T` does) and the gradient matmuls take dlogits rounded to that dtype (as the
logits path's dlogits are); grad_weight is accumulated in float32 over row chunks, a VOCAB_SLICE-row slice
of it at a time so the low-precision product never needs a [V, H] temporary.
Rows whose target is ignore_index are skipped on CPU (compacted out: never computed); on CUDA they are
zeroed instead of compacted, because finding them would sync with the host.
"""
from typing import Callable, Optional

import math

import torch
from torch import Tensor

from erpo.ops import row_stats
from erpo.ops.row_layout import RowLayout

BUDGET_BYTES = {"cpu": 8 << 20, "cuda": 256 << 20}  # one [R, V] float32 chunk buffer
ROWS: Optional[int] = None  # fixed rows per chunk instead of the budget (tests set it to cross chunk edges)
VOCAB_SLICE = 4096  # rows of grad_weight per low-precision accumulation product
COMPACT_IGNORED: Optional[bool] = None  # skip ignored rows by compaction; None: on CPU only (it syncs on CUDA)


def chunk_rows(n_rows: int, vocab: int, device: torch.device) -> int:
    if ROWS is not None:
        return max(1, min(ROWS, max(n_rows, 1)))
    budget = BUDGET_BYTES.get(device.type, BUDGET_BYTES["cuda"])
    return max(1, min(max(n_rows, 1), budget // (4 * max(vocab, 1))))


def _compacts(targets: Tensor) -> bool:
    return not targets.is_cuda if COMPACT_IGNORED is None else COMPACT_IGNORED


def _rows_to_compute(targets: Tensor, ignore_index: int) -> Tensor:
    if not _compacts(targets):
        return torch.arange(targets.numel(), device=targets.device)
    return (targets != ignore_index).nonzero().squeeze(1)  # no device to sync with on CPU


def _row_source(hidden: RowLayout):
    """A function flat row ids -> those hidden rows as a contiguous [r, H] tensor (read in place, then gathered)."""
    outer = hidden.n_rows // hidden.inner
    rows3d = torch.as_strided(
        hidden.tensor, (outer, hidden.inner, hidden.vocab), (hidden.stride_outer, hidden.stride_inner, 1)
    )
    return lambda idx: rows3d[idx // hidden.inner, idx % hidden.inner]


def _vocab_slices(vocab: int):
    for start in range(0, vocab, VOCAB_SLICE):
        yield slice(start, min(start + VOCAB_SLICE, vocab))


def _head_into(z: Tensor, h: Tensor, weight: Tensor, bias: Optional[Tensor], head_fp32: bool = False) -> Tensor:
    """z = h @ weight.T + bias into z (float32). An fp32 weight multiplies in fp32 (h upcast: [r, H], small); a
    16-bit one in its dtype (the BLAS accumulates in fp32, the product is rounded to that dtype, as
    `hidden @ weight.T` is), or with `head_fp32` in fp32, VOCAB_SLICE rows of the weight upcast at a time (never a
    full fp32 copy of it), so the logits are not rounded to 16 bits."""
    if weight.dtype == torch.float32:
        h = h.float()
        if bias is None:
            torch.mm(h, weight.t(), out=z)
        else:
            torch.addmm(bias.float(), h, weight.t(), out=z)
    elif head_fp32:
        h = h.float()
        for cols in _vocab_slices(weight.shape[0]):
            z[:, cols].copy_(torch.mm(h, weight[cols].float().t()))
        if bias is not None:
            z.add_(bias)
    else:
        z.copy_(torch.mm(h, weight.t()))
        if bias is not None:
            z.add_(bias)
    return z


def _logits_into(buffer: Tensor, h: Tensor, weight: Tensor, bias: Optional[Tensor], inv_temperature: float,
                 head_fp32: bool = False) -> Tensor:
    """z = (h @ weight.T + bias) * inv_temperature, float32, written into the first rows of `buffer`."""
    z = _head_into(buffer[: h.shape[0]], h, weight, bias, head_fp32)
    if inv_temperature != 1.0:
        z.mul_(inv_temperature)
    return z


def _transformed_logits(buffers, h: Tensor, weight: Tensor, bias: Optional[Tensor], tr: row_stats.LogitTransform,
                        head_fp32: bool):
    """(x, f' or None): the softmax's input x = transform(h @ weight.T + bias) in the first rows of buffers[0], and
    under a soft cap f' (row_stats.transform_) in buffers[2]."""
    r = h.shape[0]
    z = _head_into(buffers[0][:r], h, weight, bias, head_fp32)
    slope = row_stats.transform_(z, tr, buffers[2][:r] if len(buffers) > 2 else None, want_slope=len(buffers) > 2)
    return z, slope


class _Grads:
    """The float32 gradient buffers and the accumulation of one chunk's dlogits into them."""

    def __init__(self, n_rows: int, weight: Tensor, bias: Optional[Tensor], head_fp32: bool = False):
        hidden_size = weight.shape[1]
        self.weight = weight
        self.head_fp32 = head_fp32
        self.hidden = torch.zeros(n_rows, hidden_size, dtype=torch.float32, device=weight.device)
        self.weight_grad = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        self.bias = None if bias is None else torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device)

    def add(self, idx: Tensor, h: Tensor, dz: Tensor) -> None:
        if self.weight.dtype == torch.float32:
            h = h.float()
            self.hidden.index_copy_(0, idx, torch.mm(dz, self.weight))
            self.weight_grad.addmm_(dz.t(), h)
        elif self.head_fp32:  # fp32 products from a 16-bit weight, VOCAB_SLICE rows upcast at a time
            h = h.float()
            grad_h = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
            for cols in _vocab_slices(self.weight.shape[0]):
                grad_h.addmm_(dz[:, cols], self.weight[cols].float())
                self.weight_grad[cols].addmm_(dz[:, cols].t(), h)
            self.hidden.index_copy_(0, idx, grad_h)
        else:
            low = dz.to(self.weight.dtype)
            self.hidden.index_copy_(0, idx, torch.mm(low, self.weight).float())
            for start in range(0, low.shape[1], VOCAB_SLICE):
                stop = min(start + VOCAB_SLICE, low.shape[1])
                self.weight_grad[start:stop].add_(torch.mm(low[:, start:stop].t(), h))
        if self.bias is not None:
            self.bias.add_(dz.sum(dim=0))


def _chunks(hidden: RowLayout, weight: Tensor, targets: Tensor, ignore_index: int, n_buffers: int = 2):
    """The two [R, V] float32 chunk buffers (three under a soft cap: f'; allocated once per call, reused by every
    chunk), and a generator of (flat row ids, hidden rows [r, H], safe targets [r] long, ignored [r] bool, target
    in [0, V) [r] bool) per chunk."""
    rows = _rows_to_compute(targets, ignore_index)
    step = chunk_rows(rows.numel(), weight.shape[0], weight.device)
    buffers = [torch.empty((step, weight.shape[0]), dtype=torch.float32, device=weight.device)
               for _ in range(n_buffers)]
    return buffers, _chunk_rows(hidden, targets, ignore_index, rows, step, weight.shape[0])


def _chunk_rows(hidden: RowLayout, targets: Tensor, ignore_index: int, rows: Tensor, step: int, vocab: int):
    source = _row_source(hidden)
    for start in range(0, rows.numel(), step):
        idx = rows[start:start + step]
        tgt = targets[idx].long()
        ignored = tgt == ignore_index
        hit = row_stats.holds_target(tgt, ignored, vocab)
        h = source(idx)
        if not _compacts(targets):
            h = h.masked_fill(ignored.unsqueeze(1), 0)  # garbage in skipped rows must not reach grad_weight
        yield idx, h, torch.where(hit, tgt, 0), ignored, hit


def forward(hidden: RowLayout, weight: Tensor, bias: Optional[Tensor], targets: Tensor, inv_temperature: float,
            ignore_index: int, logit_scale: float = 1.0, softcap: Optional[float] = None, head_fp32: bool = False):
    """Return flat (logp, entropy, lse), each [N] float32; ignored rows give 0."""
    return forward_backward(hidden, weight, bias, targets, inv_temperature, ignore_index, None, logit_scale, softcap,
                            head_fp32)[:3]


def forward_backward(hidden: RowLayout, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                     inv_temperature: float, ignore_index: int, coefficients: Optional[Callable],
                     logit_scale: float = 1.0, softcap: Optional[float] = None, head_fp32: bool = False):
    """The forward, and with `coefficients` also the gradient in the same pass (the one-pass schedule).

    `coefficients(idx, logp, entropy)` gets a chunk's flat row ids and its (detached) float32 statistics and
    returns (g_logp, g_entropy or None), the loss's derivatives for those rows; it may only depend on them and
    on per-row constants. Returns (logp, entropy, lse, grad_hidden, grad_weight, grad_bias), grads None without
    `coefficients`. The softmax is that of row_stats.logit_transform's x (scale, soft cap, temperature); with
    `head_fp32` a 16-bit head's products are fp32 (_head_into).
    """
    device = weight.device
    tr = row_stats.logit_transform(inv_temperature, logit_scale, softcap)
    n_rows = hidden.n_rows
    logp = torch.zeros(n_rows, dtype=torch.float32, device=device)
    entropy = torch.zeros_like(logp)
    lse = torch.zeros_like(logp)
    grads = None if coefficients is None else _Grads(n_rows, weight, bias, head_fp32)
    buffers, chunks = _chunks(hidden, weight, targets, ignore_index, 3 if tr.has_softcap and grads else 2)
    nan = float("nan")
    for idx, h, tgt, ignored, hit in chunks:
        z, slope = _transformed_logits(buffers, h, weight, bias, tr, head_fp32)
        target_z = z.gather(1, tgt.unsqueeze(1)).squeeze(1)
        e = buffers[1][: z.shape[0]]
        state = row_stats.of_rows(z, e)  # z becomes z - m, e = exp(z - m): both reused by the gradient
        row_logp, row_entropy, row_lse = row_stats.finish(state, target_z)
        row_logp = row_logp.masked_fill(~hit, nan).masked_fill(ignored, 0.0)
        row_entropy = row_entropy.masked_fill(ignored, 0.0)
        logp[idx], entropy[idx], lse[idx] = row_logp, row_entropy, row_lse.masked_fill(ignored, 0.0)
        if grads is not None:
            g_logp, g_ent = _scaled(*coefficients(idx, row_logp, row_entropy), ignored, tr.grad_scale)
            dz = row_stats.grad_into(z, e, 1.0 / state.d[:, None], -(state.w / state.d)[:, None], g_logp, g_ent,
                                     tgt, hit)
            grads.add(idx, h, _times_slope(dz, slope))
    if grads is None:
        return logp, entropy, lse, None, None, None
    return logp, entropy, lse, grads.hidden, grads.weight_grad, grads.bias


def _scaled(g_logp, g_ent, ignored, grad_scale):
    """The per-row gradients times grad_scale (the chain rule's constant factor, 1/T for the plain head: the
    transform_grad_ of row_stats folded into [r] values), zero on skipped rows, shaped [r, 1]."""
    def scale(g):
        return None if g is None else (g.to(torch.float32) * grad_scale).masked_fill(ignored, 0.0)[:, None]

    return scale(g_logp), scale(g_ent)


def _times_slope(dz: Tensor, slope: Optional[Tensor]) -> Tensor:
    """The chain rule's elementwise factor f' (row_stats.transform_grad_ with grad_scale folded into the rows)."""
    return dz if slope is None else dz.mul_(slope)


def backward(hidden: RowLayout, weight: Tensor, bias: Optional[Tensor], targets: Tensor, lse: Tensor,
             entropy: Tensor, grad_logp: Optional[Tensor], grad_entropy: Optional[Tensor], inv_temperature: float,
             ignore_index: int, logit_scale: float = 1.0, softcap: Optional[float] = None, head_fp32: bool = False):
    """Recompute each chunk's logits from the saved lse and entropy and return (grad_hidden [N, H] f32,
    grad_weight [V, H] f32, grad_bias [V] f32 or None)."""
    tr = row_stats.logit_transform(inv_temperature, logit_scale, softcap)
    grads = _Grads(hidden.n_rows, weight, bias, head_fp32)
    if grad_logp is None and grad_entropy is None:
        return grads.hidden, grads.weight_grad, grads.bias
    buffers, chunks = _chunks(hidden, weight, targets, ignore_index, 3 if tr.has_softcap else 2)
    for idx, h, tgt, ignored, hit in chunks:
        z, slope = _transformed_logits(buffers, h, weight, bias, tr, head_fp32)
        z.sub_(lse[idx].unsqueeze(1))  # log p
        p = torch.exp(z, out=buffers[1][: z.shape[0]])
        g_logp = None if grad_logp is None else grad_logp[idx]
        g_ent = None if grad_entropy is None else grad_entropy[idx]
        g_logp, g_ent = _scaled(g_logp, g_ent, ignored, tr.grad_scale)
        # z - E_p[z] = log p + H: an exact shift of log p.
        dz = row_stats.grad_into(z.clamp_(min=row_stats.FLOOR), p, 1.0, entropy[idx].unsqueeze(1), g_logp, g_ent,
                                 tgt, hit)
        grads.add(idx, h, _times_slope(dz, slope))
    return grads.hidden, grads.weight_grad, grads.bias


# ---- over the sampler's truncated support S (erpo/ops/support.py) --------------------------------------------

def forward_support(hidden: RowLayout, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                    inv_temperature: float, ignore_index: int, support, ids: Optional[Tensor]):
    """Flat [N] float32 (logp, H, lse) over S, the same over the whole vocabulary, tau (NaN in replay), |S| and
    whether the target was added to S, from one computation of each chunk's logits."""
    from erpo.ops import support as support_lib

    out = [torch.zeros(hidden.n_rows, dtype=torch.float32, device=weight.device) for _ in range(9)]
    (z_buffer, e_buffer), chunks = _chunks(hidden, weight, targets, ignore_index)
    for idx, h, tgt, ignored, hit in chunks:
        z = _logits_into(z_buffer, h, weight, bias, inv_temperature)
        tau = support_lib.threshold(z, support) if ids is None else torch.full_like(z[:, 0], math.nan)
        keep = support_lib.kept(z, tgt, hit, tau if ids is None else None, None if ids is None else ids[idx])
        target_z = z.gather(1, tgt.unsqueeze(1)).squeeze(1)
        (logp_f, h_f, lse_f), (logp_s, h_s, lse_s) = support_lib.forward_rows(z, target_z, keep, e_buffer[: z.shape[0]])
        values = (logp_s.masked_fill(~hit, math.nan), h_s, lse_s, logp_f.masked_fill(~hit, math.nan), h_f, lse_f, tau,
                  *support_lib.row_counts(keep, target_z, tau))
        for column, value in zip(out, values):
            column[idx] = value.masked_fill(ignored, 0.0)
    return tuple(out)


def backward_support(hidden: RowLayout, weight: Tensor, bias: Optional[Tensor], targets: Tensor, saved, grads,
                     inv_temperature: float, ignore_index: int, ids: Optional[Tensor]):
    """(grad_hidden, grad_weight, grad_bias) float32 for the gradients (g_logp_S, g_H_S, g_logp, g_H) of
    forward_support's outputs; `saved` = (lse_S, H_S, lse, H, tau)."""
    from erpo.ops import support as support_lib

    result = _Grads(hidden.n_rows, weight, bias)
    if all(g is None for g in grads):
        return result.hidden, result.weight_grad, result.bias
    (z_buffer, _), chunks = _chunks(hidden, weight, targets, ignore_index)
    for idx, h, tgt, ignored, hit in chunks:
        z = _logits_into(z_buffer, h, weight, bias, inv_temperature)
        lse_s, h_s, lse_f, h_f, tau = (value[idx].unsqueeze(1) for value in saved)
        keep = support_lib.kept(z, tgt, hit, tau.squeeze(1) if ids is None else None, None if ids is None else ids[idx])
        g = [None if value is None else _scaled(value[idx], None, ignored, inv_temperature)[0] for value in grads]
        dz = support_lib.backward_rows(z, keep, tgt, hit, (lse_f, h_f), (lse_s, h_s), (g[2], g[3]), (g[0], g[1]))
        result.add(idx, h, dz)
    return result.hidden, result.weight_grad, result.bias


def _replay_chunks(hidden: RowLayout, weight: Tensor, targets: Tensor, ids: Tensor, ignore_index: int):
    """Per chunk of rows: (flat row ids, hidden rows [r, H], the kept ids with the target appended [r, K + 1] (-1 =
    padding; the appended copy is padding where the target is already kept), the target's column [r], ignored,
    hit). Rows per chunk keep the gathered head rows [r, K + 1, H] within the budget."""
    rows = _rows_to_compute(targets, ignore_index)
    width = ids.shape[1] + 1
    budget = BUDGET_BYTES.get(weight.device.type, BUDGET_BYTES["cuda"])
    step = ROWS or max(1, budget // (4 * width * weight.shape[1]))
    source = _row_source(hidden)
    for start in range(0, rows.numel(), step):
        idx = rows[start:start + step]
        tgt = targets[idx].long()
        ignored = tgt == ignore_index
        hit = row_stats.holds_target(tgt, ignored, weight.shape[0])
        kept = ids[idx].long().sort(1).values
        repeated = torch.cat([torch.zeros_like(kept[:, :1], dtype=torch.bool), kept[:, 1:] == kept[:, :-1]], 1)
        kept = kept.masked_fill(repeated, -1)  # an id listed twice is one member of the set
        safe_tgt = torch.where(hit, tgt, -1)
        inside = (kept == safe_tgt.unsqueeze(1)) & hit.unsqueeze(1)
        kept = torch.cat([kept, torch.where(inside.any(1), -1, safe_tgt).unsqueeze(1)], 1)
        column = torch.where(inside.any(1), inside.int().argmax(1), kept.shape[1] - 1)
        h = source(idx)
        if not _compacts(targets):
            h = h.masked_fill(ignored.unsqueeze(1), 0)
        yield idx, h, kept, column, ignored, hit


def _kept_logits(h: Tensor, weight: Tensor, bias: Optional[Tensor], kept: Tensor, inv_temperature: float):
    """The K + 1 logits of each row's kept ids only (K dot products, not V), float32, -inf at padding; and the
    gathered head rows [r, K + 1, H] for the backward."""
    rows_w = weight[kept.clamp_min(0)]
    z = torch.bmm(rows_w, h.to(weight.dtype).unsqueeze(-1)).squeeze(-1).float()
    if bias is not None:
        z = z + bias[kept.clamp_min(0)].float()
    return z.mul_(inv_temperature).masked_fill_(kept < 0, -math.inf), rows_w


def replay_forward(hidden: RowLayout, weight: Tensor, bias: Optional[Tensor], targets: Tensor, inv_temperature: float,
                   ignore_index: int, ids: Tensor):
    """Flat [N] float32 (logp, H, lse) over each row's replayed kept set, from its K logits only."""
    out = [torch.zeros(hidden.n_rows, dtype=torch.float32, device=weight.device) for _ in range(3)]
    for idx, h, kept, column, ignored, hit in _replay_chunks(hidden, weight, targets, ids, ignore_index):
        z, _ = _kept_logits(h, weight, bias, kept, inv_temperature)
        target_z = z.gather(1, column.unsqueeze(1)).squeeze(1)
        logp, entropy, lse = row_stats.finish(row_stats.of_rows(z), target_z)
        for values, value in zip(out, (logp.masked_fill(~hit, math.nan), entropy, lse)):
            values[idx] = value.masked_fill(ignored, 0.0)
    return tuple(out)


def replay_backward(hidden: RowLayout, weight: Tensor, bias: Optional[Tensor], targets: Tensor, ids: Tensor,
                    lse: Tensor, entropy: Tensor, grad_logp: Optional[Tensor], grad_entropy: Optional[Tensor],
                    inv_temperature: float, ignore_index: int):
    """(grad_hidden, grad_weight, grad_bias) float32 of replay_forward: the gradient reaches the kept rows of the
    head only."""
    grads = _Grads(hidden.n_rows, weight, bias)
    for idx, h, kept, column, ignored, hit in _replay_chunks(hidden, weight, targets, ids, ignore_index):
        z, rows_w = _kept_logits(h, weight, bias, kept, inv_temperature)
        log_q = z.sub_(lse[idx].unsqueeze(1))
        q = torch.exp(log_q)
        g_logp, g_ent = _scaled(None if grad_logp is None else grad_logp[idx],
                                None if grad_entropy is None else grad_entropy[idx], ignored, inv_temperature)
        dz = row_stats.grad_into(log_q.clamp_(min=row_stats.FLOOR), q, 1.0, entropy[idx].unsqueeze(1), g_logp, g_ent,
                                 column, hit).masked_fill_(kept < 0, 0.0)
        grads.hidden.index_copy_(0, idx, torch.bmm(dz.unsqueeze(1).to(rows_w.dtype), rows_w).squeeze(1).float())
        flat_ids, flat_dz = kept.reshape(-1).clamp_min(0), dz.reshape(-1)
        grads.weight_grad.index_add_(0, flat_ids, flat_dz.unsqueeze(1) * h.float().repeat_interleave(kept.shape[1], 0))
        if grads.bias is not None:
            grads.bias.index_add_(0, flat_ids, flat_dz)
    return grads.hidden, grads.weight_grad, grads.bias
