"""The sampler's truncated support S: the vocabulary ids a rollout engine actually sampled a token from.

vLLM and SGLang sample from softmax(z / T) restricted to S and renormalised, where S comes from min-p, then
top-k, then top-p (vLLM 0.32 `Sampler.sample`: temperature, the min-p logits processor, `apply_top_k_top_p`).
Scoring the sampled token against the full vocabulary biases the importance ratio by the kept mass; scoring it
against S removes the bias. Two ways to know S:

- recompute (`Support(top_k, top_p, min_p)`): the trainer redoes the truncation on its own logits. In x = z / T
  units, with m the row max: min-p keeps x >= m + log(min_p) (vLLM: p_j >= min_p * p_max); top-k keeps
  x >= the k-th largest of what min-p kept (ties at the k-th value all kept, as vLLM); top-p keeps, of what
  top-k kept, every token whose strictly larger tokens hold less than p of the renormalised mass (vLLM: the
  ascending cumulative sum > 1 - p; the largest token always stays). Each is a threshold tau on x, so
  S = {j : x_j >= tau}. One difference: at a top-p boundary of exactly tied values vLLM keeps a subset that
  depends on its sort order; here all tied values are kept. The target is always in S (a boundary decided
  the other way by the engine adds it, and `support_target_added` counts it, as prime-rl does).
- replay (`support_ids`, [..., K] ids padded with -1): the kept set the engine recorded. A target outside
  its row's set is an input error.

`threshold` finds tau without sorting: a radix select over the float32 keys of x, three passes of 11, 11
and 10 bits, each a histogram of counts (top-k) or of mass (top-p) over the row; min-p is closed form.
Passes over V per row: 3 for top-k, 3 for top-p plus one for its normaliser; `reduce` sums the histograms of a
vocabulary-sharded row over the ranks (its default does nothing).
"""
import math
from typing import Callable, Optional

import torch
from torch import Tensor

from erpo.ops import row_stats
from erpo.ops.support_config import Support  # noqa: F401  (the public home is erpo.Support)

RADIX_BITS = (11, 11, 10)  # most significant first; 32 bits in all


def support_ids_from_csr(indptr: Tensor, indices: Tensor, pad: int = -1) -> Tensor:
    """[N, K_max] kept ids, padded with `pad`, from the CSR form an engine returns (row i's ids are
    indices[indptr[i]:indptr[i+1]])."""
    if indptr.dim() != 1 or indices.dim() != 1 or indptr.numel() < 1:
        raise ValueError(f"CSR support: indptr and indices must be 1-D (indptr of N + 1 offsets), got shapes "
                         f"{tuple(indptr.shape)} and {tuple(indices.shape)}")
    indptr = indptr.long()
    sizes = indptr[1:] - indptr[:-1]
    if bool((sizes < 0).any()) or int(indptr[-1]) != indices.numel() or int(indptr[0]) != 0:
        raise ValueError(f"CSR support: indptr must rise from 0 to len(indices) = {indices.numel()}")
    width = int(sizes.max()) if sizes.numel() else 0
    out = torch.full((sizes.numel(), width), pad, dtype=torch.long, device=indices.device)
    row = torch.repeat_interleave(torch.arange(sizes.numel(), device=indices.device), sizes)
    column = torch.arange(indices.numel(), device=indices.device) - indptr[:-1].repeat_interleave(sizes)
    out[row, column] = indices.long()
    return out


def _keys(x: Tensor) -> Tensor:
    """int64 keys in [0, 2^32) ordered as the float32 values x (-0.0 counted as +0.0)."""
    bits = (x.float() + 0.0).view(torch.int32).to(torch.int64)
    unsigned = bits & 0xFFFFFFFF
    return torch.where(bits < 0, unsigned ^ 0xFFFFFFFF, unsigned | 0x80000000)


def _value(key: Tensor) -> Tensor:
    """The float32 values of keys made by _keys."""
    unsigned = torch.where(key >= 0x80000000, key ^ 0x80000000, key ^ 0xFFFFFFFF)
    return (unsigned - ((unsigned >> 31) << 32)).to(torch.int32).view(torch.float32)


def _select(keys: Tensor, weight: Tensor, goal: Tensor, reduce: Callable[[Tensor], Tensor]) -> Tensor:
    """Per row, the value at which the weight summed from the largest value down first reaches `goal` (the
    smallest kept value), or -inf where the row's whole weight stays below `goal` (everything kept)."""
    rows = keys.shape[0]
    prefix = torch.zeros(rows, dtype=torch.int64, device=keys.device)
    above = torch.zeros(rows, dtype=weight.dtype, device=keys.device)
    reached = torch.ones(rows, dtype=torch.bool, device=keys.device)
    shift = 32
    for bits in RADIX_BITS:
        shift -= bits
        in_range = (keys >> (shift + bits)) == prefix.unsqueeze(-1)
        digit = (keys >> shift) & ((1 << bits) - 1)
        hist = torch.zeros(rows, 1 << bits, dtype=weight.dtype, device=keys.device)
        hist = reduce(hist.scatter_add_(1, digit, torch.where(in_range, weight, torch.zeros_like(weight))))
        from_top = torch.cat([hist.flip(-1).cumsum(-1).flip(-1), hist.new_zeros(rows, 1)], -1)  # weight of bins >= b
        found = ((above.unsqueeze(-1) + from_top[:, :-1]) >= goal.unsqueeze(-1)).sum(-1) - 1  # highest bin reaching it
        reached &= found >= 0
        found = found.clamp_min(0)
        above = above + from_top.gather(1, (found + 1).unsqueeze(-1)).squeeze(-1)
        prefix = (prefix << bits) | found
    return torch.where(reached, _value(prefix), torch.full((rows,), -math.inf, device=keys.device))


def threshold(x: Tensor, support: Support, row_max: Optional[Tensor] = None,
              reduce: Optional[Callable[[Tensor], Tensor]] = None) -> Tensor:
    """tau [rows] such that S = {j : x_j >= tau} for rows x [rows, V] of scaled logits (float32 or float64).

    `row_max`: the rows' max (over every shard, for a sharded row); `reduce`: sums a [rows, bins] histogram
    over the shards. A row of only -inf gets tau = -inf; a row holding NaN gets NaN (S then keeps it whole, so
    the NaN reaches its outputs)."""
    reduce = reduce or (lambda t: t)
    x = x.float()
    m = x.amax(-1) if row_max is None else row_max.float()
    tau = torch.full_like(m, -math.inf)
    if support.min_p:
        tau = torch.maximum(tau, m + math.log(support.min_p))
    keys = _keys(x) if support.top_k is not None or (support.top_p or 1) < 1 else None
    if support.top_k is not None:
        counts = (x >= tau.unsqueeze(-1)).to(torch.float64)
        tau = torch.maximum(tau, _select(keys, counts, torch.full_like(m, support.top_k, dtype=torch.float64), reduce))
    if (support.top_p or 1) < 1:
        shifted = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).unsqueeze(-1)
        mass = torch.where(x >= tau.unsqueeze(-1), torch.exp((x - shifted).double()), 0.0)
        goal = reduce(mass.sum(-1, keepdim=True)).squeeze(-1) * support.top_p
        tau = torch.maximum(tau, _select(keys, mass, goal, reduce))
    return torch.where(torch.isnan(m) | torch.isneginf(m), m, tau)


# ---- the row math over S, for the torch backends of the fused op and the fused head --------------------------

def kept(z: Tensor, tgt: Tensor, hit: Tensor, tau: Optional[Tensor] = None, ids: Optional[Tensor] = None) -> Tensor:
    """[r, V] bool: S of each row, from tau [r] (recompute: z >= tau; a NaN entry stays, so it reaches the row's
    outputs) or ids [r, K] (replay, -1 = padding); the row's target (where `hit`) is always in."""
    if ids is not None:
        keep = torch.zeros(z.shape, dtype=torch.bool, device=z.device)
        keep.scatter_(1, ids.clamp_min(0).long(), ids >= 0)
    else:
        keep = ~(z.float() < tau.float().unsqueeze(-1))  # tau is a float32 value of the row (threshold)
    return keep.scatter_(1, tgt.long().unsqueeze(-1), hit.unsqueeze(-1) | keep.gather(1, tgt.long().unsqueeze(-1)))


def row_counts(keep: Tensor, target_z: Tensor, tau: Tensor) -> tuple[Tensor, Tensor]:
    """|S| per row, and 1 where the target is in S only because it was added (below the recomputed threshold; the
    engine decided the boundary the other way), as floats for the metrics."""
    return keep.sum(-1).float(), (target_z.float() < tau.float()).float()


def forward_rows(z: Tensor, target_z: Tensor, keep: Tensor, e_full: Optional[Tensor] = None):
    """((logp, H, lse) over the whole row, (logp, H, lse) over S) of scaled logits z [r, V] (z is overwritten),
    both states from the same read of the rows."""
    over_s = z.masked_fill(~keep, -math.inf)
    full = row_stats.finish(row_stats.of_rows(z, e_full), target_z)
    return full, row_stats.finish(row_stats.of_rows(over_s), target_z)


def backward_rows(z: Tensor, keep: Tensor, tgt: Tensor, hit: Tensor, full: tuple, over_s: tuple, grads_full: tuple,
                  grads_s: tuple) -> Tensor:
    """dz of scaled logits z [r, V] (overwritten) for the gradients (g_logp, g_H) of both states, per-row values
    [r, 1]: full = (lse, H), over_s = (lse_S, H_S); a None pair adds nothing. Over S, p_j = e^(z_j - lse_S) on
    S and 0 elsewhere, so entries outside S get only the full distribution's term."""
    dz = None
    if any(g is not None for g in grads_s):
        log_q = (z - over_s[0]).masked_fill_(~keep, -math.inf)
        q = torch.exp(log_q)
        dz = row_stats.grad_into(log_q.clamp_(min=row_stats.FLOOR), q, 1.0, over_s[1], *grads_s, tgt, hit)
    if any(g is not None for g in grads_full):
        log_p = z.sub_(full[0])
        p = torch.exp(log_p)
        part = row_stats.grad_into(log_p.clamp_(min=row_stats.FLOOR), p, 1.0, full[1], *grads_full, tgt, hit)
        dz = part if dz is None else dz.add_(part)
    return torch.zeros_like(z) if dz is None else dz
