"""The CUDA side of the row state (csrc/softmax_row_math.h, through the g++ host shim) against the torch one
(erpo/ops/row_stats.py): the same row cut into the same chunks, each chunk's state merged in the same order,
must give the same (logp, entropy, lse), and the same non-finite values where the NaN policy says so. The
header counts in base 2 and starts m at a finite value; row_stats counts in base e and shifts an all -inf part
by 0: these are the differences the comparison is to show harmless.

Tolerance: both sides compute in float32 from the same float32 inputs, each within a few roundings of the
float64 truth (test_host_math.py's row_tolerance, 8 roundings of the row's size), so they agree to twice that.
"""
import math

import pytest
import torch

from erpo.ops import row_stats
from tests.csrc import host_shim as hs
from tests.csrc.test_host_math import row_tolerance


def torch_chunked_row(row, inv_t, target, chunk, order, finished=False):
    """row_stats' twin of the shim's chunked_row: chunk states in `order`, merged, then finished. With
    `finished`, each chunk enters the merge as its (lse, H) only, as a vocabulary shard does in vocab_parallel."""
    x = row.to(torch.float32) * inv_t
    parts = [row_stats.of_rows(x[c * chunk:(c + 1) * chunk].clone()) for c in order]
    parts = row_stats.RowState(*(torch.stack(field) for field in zip(*parts)))
    if finished:
        _, entropy, lse = row_stats.finish(parts, torch.zeros_like(parts.m))
        parts = row_stats.from_finished(lse, entropy)
    return torch.stack(row_stats.finish(row_stats.merge(parts), x[target]))


def make_row(kind, vocab):
    if kind == "unit":
        row = torch.randn(vocab)
    elif kind == "bf16-large":  # bf16 logits of magnitude 30+ (and a few in the thousands)
        row = (torch.randn(vocab) * 8 + 35).to(torch.bfloat16).float()
        row[:: max(1, vocab // 3)] *= 90
    else:  # a masked vocabulary: -inf entries, including whole chunks of them
        row = torch.randn(vocab) * 3
        row[torch.rand(vocab) < 0.3] = -math.inf
        row[: vocab // 4] = -math.inf
    return row


def assert_same(cpp, ours, tol, what):
    """Equal within tol where finite; the very same NaN / inf pattern elsewhere."""
    assert torch.equal(torch.isnan(cpp), torch.isnan(ours)), f"{what}: NaN pattern {cpp} vs {ours}"
    inf = torch.isinf(cpp)
    assert torch.equal(inf, torch.isinf(ours)) and torch.equal(cpp[inf], ours[inf]), f"{what}: {cpp} vs {ours}"
    finite = torch.isfinite(cpp)
    err = (cpp[finite].double() - ours[finite].double()).abs().max() if bool(finite.any()) else 0.0
    assert float(err) <= tol, f"{what}: {cpp} vs {ours}"


@pytest.mark.parametrize("kind", ("unit", "bf16-large", "masked"))
@pytest.mark.parametrize("finished", (False, True), ids=("states", "finished-parts"))
def test_chunk_states_merge_alike(shim, kind, finished):
    vocab = 1031
    row = make_row(kind, vocab)
    inv_t = 1.0 / 0.7
    target = int(torch.isfinite(row).nonzero()[-1, 0])
    tol = 2 * float(row_tolerance(row[None], inv_t))
    for chunk in (1, 64, 300, vocab):
        n_chunks = -(-vocab // chunk)
        for order in (list(range(n_chunks)), torch.randperm(n_chunks).tolist()):
            cpp = hs.chunked_row(shim, row, inv_t, target, chunk, order, 1, False)
            ours = torch_chunked_row(row, inv_t, target, chunk, order, finished)
            assert_same(cpp, ours, tol, f"{kind} chunk={chunk}")


@pytest.mark.parametrize("poison", (math.nan, math.inf, None), ids=("nan", "+inf", "all-masked"))
def test_non_finite_rows_alike(shim, poison):
    """NaN and +inf poison lse, entropy and logp on both sides; a row of only -inf ends as lse = -inf, NaN."""
    row = torch.randn(96)
    if poison is None:
        row[:] = -math.inf
    else:
        row[40] = poison
    for chunk, order in ((96, [0]), (16, [5, 0, 3, 1, 4, 2])):
        cpp = hs.chunked_row(shim, row, 1.0, 7, chunk, order, 1, False)
        ours = torch_chunked_row(row, 1.0, 7, chunk, order)
        assert_same(cpp, ours, 0.0, f"poison={poison} chunk={chunk}")
        if poison is None:
            assert float(cpp[2]) == -math.inf and bool(torch.isnan(cpp[:2]).all())
        else:
            assert bool(torch.isnan(cpp).all())

