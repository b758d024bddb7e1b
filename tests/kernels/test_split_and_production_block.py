"""The Triton kernels on the paths tests/ops does not reach, against the float64 reference.

- The production block: tests/ops shrinks blocks to 64 lanes; here V = 151,936 bf16 runs at the real
  DEFAULT block (4096 lanes, 37 loop steps, a masked tail of 384), a few rows, values and both gradient terms.
- The split-V path (rows split into chunks whose partial states merge associatively), forced under the
  interpreter by a low threshold: values, gradients, in place, ignore rows, -inf entries, bad rows, targets
  on chunk edges. A spy on the launches checks the path under test really ran (a split that silently
  stayed unsplit would otherwise pass).
On a GPU these run the compiled kernels (autotuned), so the spies only check the grid there.
"""
import pytest
import torch

import erpo
import erpo.kernels.logprobs_entropy as triton_kernels
from tests.conftest import DEVICE
from tests.ops.test_logprobs_entropy import GRAD_RTOL, VALUE_RTOL, reference, rel_err

PRODUCTION_VOCAB = 151_936
# The Triton interpreter rounds fp32 -> bf16 by truncation (see tests/ops): one bf16 ulp of 2^-7.
BF16_GRAD_RTOL = 2.0**-7 if DEVICE == "cpu" else GRAD_RTOL[torch.bfloat16]


class LaunchSpy:
    """Wraps a kernel (or autotuner) object: records grid and meta-parameters of every launch."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def record(*args, **kwargs):
            self.launches.append((tuple(grid), {k: v for k, v in kwargs.items() if k.isupper()}))
            return launch(*args, **kwargs)

        return record


@pytest.fixture
def spies(monkeypatch):
    spied = {name: LaunchSpy(getattr(triton_kernels, name)) for name in ("_fwd", "_partial", "_bwd")}
    for name, spy in spied.items():
        monkeypatch.setattr(triton_kernels, name, spy)
    return spied


def check(logits, targets, g_logp, g_ent, grad_rtol, inplace=False, **kw):
    # log_softmax's gradient is NaN at -inf logits (the bug this op avoids); -1e4 has p = exp(-1e4 - max) = 0
    # exactly in float64 too, so the reference keeps the same distribution with a finite gradient.
    masked = logits == float("-inf")
    ref_leaf = torch.where(masked, -1e4, logits.detach().double()).requires_grad_()
    ref_logp, ref_entropy = reference(ref_leaf, targets, **kw)
    torch.autograd.backward([ref_logp, ref_entropy], [g_logp.double(), g_ent.double()])
    source = logits.detach().clone().requires_grad_()
    work = source * 1 if inplace else source  # in place needs a non-leaf whose producer saved nothing
    logp, entropy = erpo.logprobs_and_entropy(work, targets, backend="triton", inplace_grad=inplace, **kw)
    assert rel_err(logp, ref_logp.detach(), 1.0) < VALUE_RTOL
    assert rel_err(entropy, ref_entropy.detach(), 1.0) < VALUE_RTOL
    torch.autograd.backward([logp, entropy], [g_logp, g_ent])
    assert torch.all(source.grad[masked] == 0)  # -inf logits: exactly zero gradient
    assert rel_err(source.grad, ref_leaf.grad) < grad_rtol
    return source.grad


def test_production_block_size_bf16(spies):
    assert triton_kernels.MAX_BLOCK_V == triton_kernels.CONFIGS[0][0] == 4096  # nothing shrank the block
    logits = (torch.randn(3, PRODUCTION_VOCAB, device=DEVICE) * 12).to(torch.bfloat16)
    logits[1, :5000] = float("-inf")  # a masked stretch across the first blocks
    logits[2, -7:] = 40.0  # the row max in the masked tail block: rebases on the very last step
    targets = torch.tensor([17, PRODUCTION_VOCAB - 1, 123_456], device=DEVICE)
    check(logits, targets, torch.randn(3, device=DEVICE), torch.randn(3, device=DEVICE), BF16_GRAD_RTOL)
    (grid, meta), = spies["_fwd"].launches
    assert grid == (3,) and spies["_partial"].launches == []
    if DEVICE == "cpu":
        assert meta["BLOCK_V"] == 4096 and spies["_bwd"].launches[0][1]["BLOCK_V"] == 4096


@pytest.fixture
def force_split(monkeypatch):
    monkeypatch.setattr(triton_kernels, "SPLIT_BELOW_ROWS", 64)
    monkeypatch.setattr(triton_kernels, "MIN_CHUNK", 128)
    monkeypatch.setattr(triton_kernels, "MAX_BLOCK_V", 64)  # several blocks per chunk, and a fast interpreter


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inplace", [False, True])
def test_split_v_matches_reference(force_split, spies, dtype, inplace):
    vocab = 1000  # 4 chunks of 256 (the last one 232 wide), 4 blocks each
    logits = (torch.randn(5, vocab, device=DEVICE) * 6).to(dtype)
    logits[0, 700:] += 30  # the row max in a late chunk
    logits[2, 100:400] = float("-inf")  # a whole chunk's worth of masked vocabulary, crossing a chunk edge
    targets = torch.tensor([255, 256, 999, -100, 0], device=DEVICE)  # both sides of an edge; one ignored row
    grad = check(logits, targets, torch.randn(5, device=DEVICE), torch.randn(5, device=DEVICE),
                 BF16_GRAD_RTOL if dtype == torch.bfloat16 else GRAD_RTOL[dtype], inplace=inplace)
    assert torch.equal(grad[3], torch.zeros_like(grad[3]))
    (grid, meta), = spies["_partial"].launches
    assert grid == (5, 4) and spies["_fwd"].launches == []
    assert spies["_bwd"].launches[0][0] == (5, 4)


def test_split_v_temperature_and_one_output(force_split, spies):
    logits = torch.randn(2, 777, device=DEVICE) * 5
    targets = torch.tensor([3, 770], device=DEVICE)
    leaf = logits.clone().requires_grad_()
    logp, _ = erpo.logprobs_and_entropy(leaf, targets, temperature=0.7, backend="triton")
    logp.sum().backward()
    ref_leaf = logits.double().requires_grad_()
    ref_logp, _ = reference(ref_leaf, targets, temperature=0.7)
    ref_logp.sum().backward()
    assert rel_err(logp, ref_logp.detach(), 1.0) < VALUE_RTOL
    assert rel_err(leaf.grad, ref_leaf.grad) < GRAD_RTOL[torch.float32]
    assert spies["_partial"].launches[0][0][1] > 1


def test_split_v_bad_rows_stay_in_their_row(force_split, spies):
    logits = torch.randn(5, 900, device=DEVICE) * 4
    logits[1, 600] = float("nan")  # in a late chunk: the merge must carry it
    logits[2, 5] = float("inf")
    logits[3] = float("-inf")
    targets = torch.randint(0, 900, (5,), device=DEVICE)
    leaf = logits.clone().requires_grad_()
    logp, entropy = erpo.logprobs_and_entropy(leaf, targets, backend="triton")
    assert not torch.isfinite(logp[1:4]).any() and not torch.isfinite(entropy[1:4]).any()
    good = [0, 4]
    ref_logp, ref_entropy = reference(logits[good], targets[good])
    assert rel_err(logp[good], ref_logp, 1.0) < VALUE_RTOL and rel_err(entropy[good], ref_entropy, 1.0) < VALUE_RTOL
    (logp[good].sum() + entropy[good].sum()).backward()
    assert torch.isfinite(leaf.grad[good]).all() and not torch.isfinite(leaf.grad[1]).all()
    assert spies["_partial"].launches[0][0][1] > 1


def test_split_choice():
    """Rows below the threshold are split into a power of two of chunks, never narrower than MIN_CHUNK."""
    cpu = torch.device("cpu")
    old = triton_kernels.SPLIT_BELOW_ROWS
    try:
        triton_kernels.SPLIT_BELOW_ROWS = 528  # two waves of 132 SMs x 2 programs
        assert triton_kernels.n_chunks(4096, PRODUCTION_VOCAB, cpu) == 1
        assert triton_kernels.n_chunks(528, PRODUCTION_VOCAB, cpu) == 1
        assert triton_kernels.n_chunks(8, PRODUCTION_VOCAB, cpu) == 64
        assert triton_kernels.n_chunks(1, PRODUCTION_VOCAB, cpu) == 64  # 151936 / 128 would go under MIN_CHUNK
        assert triton_kernels.n_chunks(100, PRODUCTION_VOCAB, cpu) == 8
        assert triton_kernels.n_chunks(8, 1000, cpu) == 1
    finally:
        triton_kernels.SPLIT_BELOW_ROWS = old
