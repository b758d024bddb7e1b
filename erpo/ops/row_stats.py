"""The online softmax row state of erpo's torch code, used by the torch backends of the fused op and the fused
head and by the cross-rank merge of vocab_parallel.py: new row math (e.g. a truncated support) goes here once.
Its twins count in base 2: kernels/online_softmax.py and csrc/softmax_row_math.h (tests/csrc/
test_row_stats_vs_header.py holds the header to this module).

The scaled logits x = logits / T of a row, or of a part of one, are (m, d, w): m the shift (the part's max; 0
for a part of only -inf), d = sum e^(x - m), w = sum e^(x - m) (x - m). States of disjoint parts merge exactly;
lse = m + log d, H = log d - w / d. NaN policy, with no flag: a NaN or +inf logit makes x - m NaN (+inf - +inf),
hence d, lse, H and logp NaN, in its row only. -inf entries add 0; a row of only -inf has lse = -inf, H NaN.
"""
import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

# x - m is clamped here once e^(x - m) is taken: e is 0 below it (float64 too), and 0 * FLOOR = 0 where 0 * -inf
# would be NaN (one in-place pass, as the kernels' clamp of t).
FLOOR = -2048.0


class LogitTransform(NamedTuple):
    """What the softmax sees of a logit y: x = x_scale * f(cap_in * y), f = tanh with a soft cap (Gemma 2/3's
    final_logit_softcapping c: x = c tanh(s y / c) / T), the identity otherwise (x = s y / T), s the model's
    logit scale (Cohere's logit_scale, applied before the cap as the models and TRL do), T the temperature.
    dx/dy = grad_scale * f'(cap_in * y), f' = 1 - tanh^2 = 1 - u^2 with u = f(cap_in y).
    The plain head (s = 1, no cap) has x_scale = grad_scale = 1 / T exactly: today's arithmetic, bit for bit.
    Shared by every language's backends: the Triton kernels (kernels/online_softmax.py transform) take these
    three scalars and the has_softcap flag."""
    x_scale: float
    cap_in: float
    grad_scale: float
    has_softcap: bool


def logit_transform(inv_temperature: float, logit_scale: float = 1.0, softcap: Optional[float] = None
                    ) -> LogitTransform:
    if softcap is None:
        scale = float(logit_scale) * inv_temperature
        return LogitTransform(scale, 1.0, scale, False)
    return LogitTransform(float(softcap) * inv_temperature, float(logit_scale) / float(softcap),
                          float(logit_scale) * inv_temperature, True)


def check_logit_transform(logit_scale, softcap) -> None:
    """One line naming the bad argument: softcap is None or a finite number > 0, logit_scale a finite number >= 0
    (the Triton op folds the scale into its running max, which a negative one would turn into a min)."""
    for name, value in (("logit_scale", logit_scale), ("softcap", softcap)):
        if value is None and name == "softcap":
            continue
        if isinstance(value, (bool, Tensor)) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a Python number{' or None' if name == 'softcap' else ''}, "
                            f"got {type(value).__name__}")
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")
    if softcap is not None and softcap <= 0:
        raise ValueError(f"softcap must be > 0 (c in c * tanh(y / c)) or None, got {softcap}")
    if logit_scale < 0:
        raise ValueError(f"logit_scale must be >= 0 (a model's logit multiplier), got {logit_scale}")


def transform_(y: Tensor, tr: LogitTransform, slope_out: Optional[Tensor] = None, want_slope: bool = True
               ) -> Optional[Tensor]:
    """y (float32/64) becomes x in place; with a soft cap, returns f' = 1 - u^2 (into slope_out when given, the
    caller's buffer: transform_grad_ wants it; not computed without want_slope), else None. +-inf logits become
    +-c under a cap, as in the model."""
    if not tr.has_softcap:
        if tr.x_scale != 1.0:
            y.mul_(tr.x_scale)
        return None
    u = y.mul_(tr.cap_in).tanh_()
    if not want_slope:
        u.mul_(tr.x_scale)
        return None
    slope = torch.mul(u, u, out=slope_out) if slope_out is not None else u * u
    slope.neg_().add_(1.0)
    u.mul_(tr.x_scale)
    return slope


def transform_grad_(dx: Tensor, tr: LogitTransform, slope: Optional[Tensor]) -> Tensor:
    """dx (the gradient w.r.t. x) becomes the gradient w.r.t. the logit y in place: dx * grad_scale * f'."""
    if slope is not None:
        dx.mul_(slope)
    return dx.mul_(tr.grad_scale)


class RowState(NamedTuple):
    m: Tensor
    d: Tensor
    w: Tensor


def of_rows(x: Tensor, e_out: Optional[Tensor] = None) -> RowState:
    """The state of each row (last dim) of the scaled logits x, computed in place: x becomes x - m (clamped at
    FLOOR). e^(x - m) is written into `e_out` and kept there when given (the caller reuses it), else into a new
    tensor that the weighted sum overwrites."""
    m = x.amax(dim=-1, keepdim=True)
    m = m.masked_fill(torch.isneginf(m), 0.0)  # a row of only -inf: shift by 0, never -inf - -inf
    x.sub_(m)
    e = torch.exp(x) if e_out is None else torch.exp(x, out=e_out)
    x.clamp_(min=FLOOR)
    d = e.sum(dim=-1)
    if e_out is None:
        w = e.mul_(x).sum(dim=-1)
    else:  # e is the caller's: the weighted sum without a product the size of x
        w = torch.matmul(e.unsqueeze(-2), x.unsqueeze(-1)).view(d.shape)
    return RowState(m.squeeze(-1), d, w)


def from_finished(lse: Tensor, entropy: Tensor) -> RowState:
    """The state of a part whose (lse, H) are known (m = lse, d = 1, w = -H); an all -inf part (lse = -inf, H
    NaN) is the empty state, which merges as nothing."""
    empty = torch.isneginf(lse)
    return RowState(lse, (~empty).to(lse.dtype), (-entropy).masked_fill(empty, 0.0))


def merge(parts: RowState, dim: int = 0) -> RowState:
    """The state of the union of the disjoint parts stacked along `dim`."""
    m = parts.m.amax(dim=dim, keepdim=True)
    m = m.masked_fill(torch.isneginf(m), 0.0)
    delta = (parts.m - m).clamp(min=FLOOR)  # an empty part (m = -inf) gets e^delta = 0
    scale = torch.exp(delta)
    return RowState(m.squeeze(dim), (scale * parts.d).sum(dim), (scale * (parts.w + parts.d * delta)).sum(dim))


def holds_target(tgt: Tensor, ignored: Tensor, vocab: int) -> Tensor:
    """Rows whose target is one of their V entries. An id outside [0, V) that is not ignore_index (possible with
    check_targets=False, and on a vocabulary shard for targets another shard holds) gives NaN logp and no one-hot
    term in the gradient, as in the kernels."""
    return ~ignored & (tgt >= 0) & (tgt < vocab)


def finish(state: RowState, target_x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(logp, entropy, lse) of whole rows; target_x is the target's scaled logit (not shifted)."""
    log_d = torch.log(state.d)
    return target_x - state.m - log_d, log_d - state.w / state.d, state.m + log_d


def grad_into(z: Tensor, e: Tensor, scale, offset: Tensor, g_logp: Optional[Tensor], g_ent: Optional[Tensor],
              tgt: Tensor, hit: Tensor) -> Tensor:
    """dz = g_logp (onehot - p) - g_ent p (x - E_p[x]) of rows, written into z or e (returned), two passes.

    p = e * scale and x - E_p[x] = z + offset, with z the rows' x shifted and clamped at FLOOR (of_rows, or
    log p clamped), so a masked entry gets exactly 0, never 0 * -inf; per-row values (scale: 1 / d, or 1 when e
    is p; offset; the g's) keep a trailing dim of 1. dz = e (a z + b) + onehot g_logp, a = -g_ent scale,
    b = -(g_ent offset + g_logp) scale. The one-hot term goes only to rows that hold their target (`hit`).
    """
    b = 0.0 if g_logp is None else -g_logp * scale
    if g_ent is not None:
        dz = torch.addcmul(b - g_ent * offset * scale, z, -g_ent * scale, out=z).mul_(e)
    else:
        dz = e.mul_(b)
    if g_logp is not None:
        if torch.compiler.is_compiling():
            # The one-hot term as an elementwise select, which inductor fuses into the chunk's one loop (a
            # scatter would cost the compiled body a separate buffer and two more passes); an id outside [0, V)
            # matches no column.
            cols = torch.arange(z.shape[-1], device=z.device)
            return dz + torch.where(cols == tgt.unsqueeze(-1), g_logp, 0.0)
        dz.scatter_add_(-1, torch.where(hit, tgt, 0).long().unsqueeze(-1), torch.where(hit.unsqueeze(-1), g_logp, 0.0))
    return dz
