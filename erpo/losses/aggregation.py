"""Aggregation of per-token loss terms (spec section 2) as per-token weights: loss = sum_t weight_t l_t.

Weights are 0 on invalid tokens. A batch without valid tokens gives all-zero weights (its local counts are
clamped to 1): its loss is a differentiable 0 and adds nothing to the gradient, as an empty micro-batch must.

Gradient accumulation and data parallelism: a micro-batch's loss divides by its own counts unless the
caller gives the counts of the whole optimizer step (`num_items`: valid tokens, `num_seqs`: responses, over
every micro-batch and rank, TRL's `num_items_in_batch`); then the micro-batch losses sum to the loss of the
one big batch, whatever the split.
"""
from typing import Optional

import torch
from torch import Tensor

from erpo.losses.segments import segment_sum


def token_weights(agg: str, valid: Tensor, seq: Tensor, n_seqs: int, max_len: int, dtype: torch.dtype,
                  num_items: Optional[Tensor] = None, num_seqs: Optional[Tensor] = None) -> Tensor:
    ones = valid.to(dtype)
    if agg == "token-mean":
        return ones / (ones.sum().clamp_min(1) if num_items is None else num_items.to(dtype))
    if agg == "seq-mean-token-mean":
        lengths = segment_sum(ones, seq, n_seqs)
        n_nonempty = (lengths > 0).sum().clamp_min(1).to(dtype) if num_seqs is None else num_seqs.to(dtype)
        return ones / (lengths[seq].clamp_min(1) * n_nonempty)
    seqs = n_seqs if num_seqs is None else num_seqs.to(dtype)
    if agg == "seq-mean-token-sum":
        return ones / seqs
    if agg == "seq-mean-token-sum-norm":
        return ones / (seqs * max_len)
    raise ValueError(f"unknown aggregation {agg!r}")
