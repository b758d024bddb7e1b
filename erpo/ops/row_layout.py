"""Address the rows of a `[..., V]` tensor without copying it.

Kernels walk rows with a 1-D grid and find row r at `(r // inner) * stride_outer + (r % inner) * stride_inner`.
Two levels cover every layout trainers make in practice: contiguous `[N, V]`, `[B, L, V]`, and the shifted
view `hidden_logits[:, :-1, :]` whose rows are not evenly spaced. Leading dimensions that cannot be merged
into two levels (rare) are copied once, as is a vocabulary dimension with stride != 1.
"""
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RowLayout:
    tensor: torch.Tensor  # the tensor the kernel reads: the input itself, or a contiguous copy of it
    n_rows: int
    vocab: int
    inner: int
    stride_outer: int
    stride_inner: int


def _merged_leading_dims(tensor: torch.Tensor) -> list[tuple[int, int]]:
    """(size, stride) of the leading dims, size-1 dims dropped, adjacent mergeable dims merged."""
    dims = [(s, st) for s, st in zip(tensor.shape[:-1], tensor.stride()[:-1]) if s != 1]
    merged: list[tuple[int, int]] = []
    for size, stride in dims:
        if merged and merged[-1][1] == stride * size:
            merged[-1] = (merged[-1][0] * size, stride)
        else:
            merged.append((size, stride))
    return merged


def addressable_in_place(tensor: torch.Tensor) -> bool:
    """Whether the kernels can read (and write) these rows where they are, without a copy."""
    return tensor.dim() == 1 or (tensor.stride(-1) == 1 and len(_merged_leading_dims(tensor)) <= 2)


def row_layout(tensor: torch.Tensor) -> RowLayout:
    vocab = tensor.shape[-1]
    n_rows = tensor.numel() // vocab if vocab else 0
    if tensor.dim() == 1:
        return RowLayout(tensor, 1, vocab, 1, 0, 0)
    if not addressable_in_place(tensor):
        tensor = tensor.contiguous()
    dims = _merged_leading_dims(tensor)
    if not dims:
        return RowLayout(tensor, n_rows, vocab, 1, 0, 0)
    if len(dims) == 1:
        return RowLayout(tensor, n_rows, vocab, dims[0][0], 0, dims[0][1])
    (_, stride_outer), (inner, stride_inner) = dims
    return RowLayout(tensor, n_rows, vocab, inner, stride_outer, stride_inner)


def contiguous_layout_like(layout: RowLayout, tensor: torch.Tensor) -> RowLayout:
    """Layout of a contiguous tensor holding the same rows, split into the same (outer, inner) levels."""
    return RowLayout(tensor, layout.n_rows, layout.vocab, layout.inner, layout.inner * layout.vocab, layout.vocab)
