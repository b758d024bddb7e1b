"""The online softmax row state of erpo's torch code: one convention for the torch backends of the fused op
and of the fused LM head and for the merge of vocabulary shards across ranks (vocab_parallel.py). New row math
(e.g. a truncated support) goes here once; its Triton twin is kernels/online_softmax.py and its CUDA twin
csrc/softmax_row_math.h (both count in base 2; tests/csrc/test_row_stats_vs_header.py holds the header to this).

The scaled logits x = logits / T of a row, or of a part of one, are summarised by (m, d, w): m the shift (the
part's max; 0 for a part of only -inf), d = sum e^(x - m), w = sum e^(x - m) (x - m). States of disjoint parts
merge exactly (merge); lse = m + log d and H = log d - w / d (finish).
NaN policy, with no flag and no per-element test: a NaN or +inf logit makes x - m NaN (+inf - +inf), hence d,
lse, H and logp NaN, in its row only; NaN survives every merge. -inf entries (a masked vocabulary) add 0. A row
of only -inf has d = 0 and ends non-finite through log(0) (lse = -inf, H NaN).
"""
from typing import NamedTuple, Optional

import torch
from torch import Tensor

# x - m is clamped here once e^(x - m) is taken: e is exactly 0 below it (float64 too), and 0 * floor = 0
# where 0 * -inf would be NaN. One in-place pass, as the kernels' clamp of t.
FLOOR = -2048.0


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


def finish(state: RowState, target_x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(logp, entropy, lse) of whole rows; target_x is the target's scaled logit (not shifted)."""
    log_d = torch.log(state.d)
    return target_x - state.m - log_d, log_d - state.w / state.d, state.m + log_d
