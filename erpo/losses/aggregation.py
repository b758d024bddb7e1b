"""Aggregation of per-token loss terms (spec section 2) as per-token weights: loss = sum_t weight_t l_t.

Weights are 0 on invalid tokens. A batch without valid tokens gives NaN weights (0 / 0), never a
silently finite loss.
"""
import torch
from torch import Tensor

from erpo.losses.segments import segment_sum


def token_weights(agg: str, valid: Tensor, seq: Tensor, n_seqs: int, max_len: int, dtype: torch.dtype) -> Tensor:
    ones = valid.to(dtype)
    if agg == "token-mean":
        return ones / ones.sum()
    if agg == "seq-mean-token-mean":
        lengths = segment_sum(ones, seq, n_seqs)
        n_nonempty = (lengths > 0).sum().to(dtype)
        return ones / (lengths[seq].clamp_min(1) * n_nonempty)
    if agg == "seq-mean-token-sum":
        return ones / n_seqs
    if agg == "seq-mean-token-sum-norm":
        return ones / (n_seqs * max_len)
    raise ValueError(f"unknown aggregation {agg!r}")
