"""The truncated support's threshold (erpo/ops/support.py) against vLLM's own sampler, recorded on fixed logits
(tests/ops/vllm_support_fixture.py), and against a dense sort-based float64 reference."""
import importlib.util
import math

import pytest
import torch

from erpo.ops.support import Support, support_ids_from_csr, threshold
from tests.ops.vllm_support_fixture import SUPPORTS, load, logits_cases


def kept_by_threshold(x, support):
    return x >= threshold(x, support).unsqueeze(-1)


@pytest.mark.parametrize("case", sorted(logits_cases()))
def test_the_kept_set_is_vllms_up_to_exact_ties_at_the_top_p_boundary(case):
    recorded, made_by = load()
    x_all = logits_cases()[case]
    checked = 0
    for (temperature, top_k, top_p, min_p), theirs in zip(SUPPORTS, recorded[case]):
        x = x_all.float().div(temperature)
        ours = kept_by_threshold(x, Support(top_k, top_p, min_p))
        assert bool((ours | ~theirs).all()), f"{made_by}: erpo drops a token vLLM keeps ({case}, {top_k, top_p, min_p})"
        for row in (ours != theirs).any(-1).nonzero().flatten().tolist():
            # vLLM's sort order decides which of several exactly equal values at the top-p boundary stay; erpo
            # keeps them all. Any other difference fails.
            boundary = float(x[row][theirs[row]].min())
            extra = x[row][ours[row] & ~theirs[row]]
            assert top_p is not None and bool((extra == boundary).all()), (case, row, extra, boundary)
        checked += int((ours == theirs).all(-1).sum())
    assert checked > 0.9 * len(SUPPORTS) * x_all.shape[0]  # ties are the exception, not the rule


def dense_kept(x, support):
    """Sort-based float64 reference: min-p, then top-k on what it kept, then top-p on what top-k kept."""
    x = x.double()
    keep = torch.ones_like(x, dtype=torch.bool)
    if support.min_p:
        keep &= x >= x.amax(-1, keepdim=True) + math.log(support.min_p)
    if support.top_k is not None:
        masked = torch.where(keep, x, -math.inf)
        kth = masked.sort(-1, descending=True).values[:, min(support.top_k, x.shape[-1]) - 1 : support.top_k]
        keep &= masked >= kth
    if support.top_p is not None and support.top_p < 1:
        masked = torch.where(keep, x, -math.inf)
        q = torch.softmax(masked, -1)
        strictly_above = (q.unsqueeze(-2) * (masked.unsqueeze(-2) > masked.unsqueeze(-1))).sum(-1)
        keep &= strictly_above < support.top_p
    return keep


@pytest.mark.parametrize("support", [
    Support(top_k=1), Support(top_k=7), Support(top_k=333), Support(top_p=0.3), Support(top_p=0.9),
    Support(top_p=1.0), Support(min_p=0.0), Support(min_p=0.3), Support(top_k=40, top_p=0.75, min_p=0.01),
    Support(top_p=1e-9),
])
def test_threshold_matches_a_dense_sort_reference(support):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(33, 333, generator=gen) * 4
    x[3, ::5] = -math.inf  # a masked vocabulary
    x[5, :] = 1.25  # one value everywhere: every set is the whole row
    x[6, 10:20] = x[6].max() + 1  # a tie of ten at the top
    ours = kept_by_threshold(x, support)
    assert torch.equal(ours, dense_kept(x, support))
    if support.is_full(x.shape[-1]):
        assert bool(ours[torch.isfinite(x)].all())


def test_special_rows():
    x = torch.randn(3, 50)
    x[0] = -math.inf
    x[1, 4] = math.nan
    tau = threshold(x, Support(top_k=3, top_p=0.5))
    assert torch.isneginf(tau[0]) and torch.isnan(tau[1]) and torch.isfinite(tau[2])


@pytest.mark.parametrize("kwargs,field", [
    ({"top_k": 0}, "top_k"), ({"top_k": True}, "top_k"), ({"top_k": 2.0}, "top_k"), ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"), ({"min_p": 1.0}, "min_p"), ({"min_p": -0.1}, "min_p"),
])
def test_bad_supports_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"Support.{field} must be"):
        Support(**kwargs)


def test_csr_to_padded_ids():
    ids = support_ids_from_csr(torch.tensor([0, 2, 2, 5]), torch.tensor([4, 9, 1, 2, 3]))
    assert ids.tolist() == [[4, 9, -1], [-1, -1, -1], [1, 2, 3]]
    with pytest.raises(ValueError, match="indptr must rise"):
        support_ids_from_csr(torch.tensor([0, 3, 2]), torch.tensor([1, 2]))


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed (the recorded file is)")
def test_against_vllm_live():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "tests/ops/vllm_support_fixture.py", "--check"], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0 and "rows differing from vLLM live: 0 " in result.stdout, result.stderr[-2000:]
