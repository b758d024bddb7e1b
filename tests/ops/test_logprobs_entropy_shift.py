"""`logprobs_and_entropy(..., shift=True)`: unsliced `[B, L+1, V]` logits, no hidden full-size copy.

What is checked, on every backend:
- values and gradients equal the float64 reference on `logits[:, :-1]`, and the dropped (last) position gets
  exactly zero gradient, with and without `inplace_grad`;
- the gradient that reaches the logits' producer (a hook on the logits tensor) *is* the logits' storage
  with `shift=True, inplace_grad=True`; the sliced view with `inplace_grad` (the control) gets a fresh buffer;
- no `[B, L, V]`-sized buffer is allocated in the backward with `shift=True, inplace_grad=True` (allocations
  counted by the profiler on CPU, the allocator's peak on CUDA); the control, the sliced view, is seen
  allocating one, so the detector can fail.
"""
import os

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import erpo
from erpo.ops import torch_logprobs_entropy
from tests.conftest import DEVICE, KERNEL_BACKENDS
from tests.ops.test_logprobs_entropy import GRAD_RTOL, VALUE_RTOL, make_logits, reference, rel_err

BACKENDS = ["torch"] + KERNEL_BACKENDS
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture(autouse=True)
def _small_blocks(monkeypatch):
    """Several blocks per row on every backend (the interpreter stays fast; the torch backend's chunk buffers
    stay far below one [B, L, V] tensor, so the allocation test can tell them from a full-size copy)."""
    monkeypatch.setattr(torch_logprobs_entropy, "CHUNK_ELEMENTS", 4096)
    if INTERPRETED:
        import erpo.kernels.logprobs_entropy as triton_kernels

        monkeypatch.setattr(triton_kernels, "MAX_BLOCK_V", 64)


def _grad_tolerance(backend, dtype):
    if backend == "triton" and dtype == torch.bfloat16 and INTERPRETED:
        return 2.0**-7  # the interpreter truncates fp32 -> bf16 (tests/ops/test_logprobs_entropy.py)
    return GRAD_RTOL[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inplace", [False, True])
def test_shift_matches_reference_and_zeroes_the_dropped_position(backend, dtype, inplace):
    batch, positions, vocab = 3, 6, 131  # L + 1 = 6 positions, V not a multiple of any block
    base = make_logits((batch, positions, vocab), dtype)
    targets = torch.randint(0, vocab, (batch, positions - 1), device=DEVICE)
    targets[1, 2] = -100  # an ignored row among the scored ones
    g_logp, g_ent = torch.randn(batch, positions - 1, device=DEVICE), torch.randn(batch, positions - 1, device=DEVICE)

    ref_leaf = base.double().requires_grad_()
    ref_logp, ref_entropy = reference(ref_leaf[:, :-1], targets)
    torch.autograd.backward([ref_logp, ref_entropy], [g_logp.double(), g_ent.double()])

    leaf = base.clone().requires_grad_()
    logits = leaf * 1 if inplace else leaf  # in place needs a non-leaf whose producer saved nothing
    logp, entropy = erpo.logprobs_and_entropy(logits, targets, backend=backend, inplace_grad=inplace, shift=True)
    assert logp.shape == entropy.shape == targets.shape
    assert rel_err(logp, ref_logp.detach(), 1.0) < VALUE_RTOL
    assert rel_err(entropy, ref_entropy.detach(), 1.0) < VALUE_RTOL
    torch.autograd.backward([logp, entropy], [g_logp, g_ent])
    assert torch.equal(leaf.grad[:, -1], torch.zeros_like(leaf.grad[:, -1]))
    assert torch.equal(leaf.grad[1, 2], torch.zeros_like(leaf.grad[1, 2]))
    assert rel_err(leaf.grad, ref_leaf.grad) < _grad_tolerance(backend, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shift_equals_slicing_exactly_and_ignores_the_dropped_row(backend):
    logits = make_logits((2, 5, 90), torch.float32)
    targets = torch.randint(0, 90, (2, 4), device=DEVICE)
    shifted = logits.clone()
    shifted[:, -1] = float("nan")  # the dropped position is never read in the forward
    a = erpo.logprobs_and_entropy(logits[:, :-1], targets, backend=backend)
    b = erpo.logprobs_and_entropy(shifted, targets, backend=backend, shift=True)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shift_packed_rows_and_one_position(backend):
    """Logits [T+1, V] with targets [T]; and L + 1 = 1 (nothing scored, an all-zero gradient)."""
    logits = make_logits((7, 50), torch.float32).requires_grad_()
    targets = torch.randint(0, 50, (6,), device=DEVICE)
    logp, entropy = erpo.logprobs_and_entropy(logits, targets, backend=backend, shift=True)
    ref_logp, ref_entropy = reference(logits.detach()[:-1], targets)
    assert rel_err(logp, ref_logp, 1.0) < VALUE_RTOL and rel_err(entropy, ref_entropy, 1.0) < VALUE_RTOL

    single = make_logits((2, 1, 50), torch.float32).requires_grad_()
    logp, entropy = erpo.logprobs_and_entropy(single, torch.zeros(2, 0, dtype=torch.long, device=DEVICE),
                                              backend=backend, shift=True)
    assert logp.shape == (2, 0)
    (logp.sum() + entropy.sum() + single.sum() * 0).backward()
    assert torch.equal(single.grad, torch.zeros_like(single.grad))


def _producer_and_logits(batch, positions, vocab, hidden_size=8):
    """An LM head: logits = hidden @ W.T, a non-leaf whose producer (mm) does not save its output."""
    hidden = torch.randn(batch, positions, hidden_size, device=DEVICE, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, device=DEVICE, requires_grad=True)
    return hidden, weight, hidden @ weight.T


def _gradient_reaching(logits):
    """Record the gradient autograd hands to the logits (what the producer's backward receives)."""
    seen = []
    logits.register_hook(lambda grad: seen.append((grad.data_ptr(), tuple(grad.shape))))
    return seen


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_gradient_reaching_the_producer_aliases_the_logits(backend):
    targets = torch.randint(0, 70, (2, 4), device=DEVICE)
    hidden, weight, logits = _producer_and_logits(2, 5, 70)
    seen = _gradient_reaching(logits)
    logp, entropy = erpo.logprobs_and_entropy(logits, targets, backend=backend, inplace_grad=True, shift=True)
    (logp.sum() - entropy.sum()).backward()
    assert seen == [(logits.data_ptr(), tuple(logits.shape))]  # the logits' storage itself, full size
    grads = hidden.grad.clone(), weight.grad.clone()

    # Control: the sliced view with inplace_grad. The kernel writes in place, but autograd's slice backward
    # hands the producer a fresh full-size buffer: the case shift exists for. Same gradients either way.
    hidden.grad = weight.grad = None
    logits = hidden @ weight.T
    seen = _gradient_reaching(logits)
    logp, entropy = erpo.logprobs_and_entropy(logits[:, :-1], targets, backend=backend, inplace_grad=True)
    (logp.sum() - entropy.sum()).backward()
    assert len(seen) == 1 and seen[0][0] != logits.data_ptr()
    assert rel_err(hidden.grad, grads[0].double()) < 1e-6 and rel_err(weight.grad, grads[1].double()) < 1e-6


def _largest_allocation_in_backward(loss) -> int:
    """Bytes of the largest single allocation the backward makes (profiler on CPU; the allocator's peak
    above what was already allocated on CUDA, an upper bound of any one allocation)."""
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss.backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss.backward()
    sizes = [e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.nbytes() > 0]
    assert sizes, "the profiler recorded no allocation at all: it cannot see what this test counts"
    return max(sizes)


@pytest.mark.parametrize("backend", ["torch"] + [b for b in KERNEL_BACKENDS if not INTERPRETED])
def test_no_full_size_buffer_in_the_backward(backend):
    """The Triton interpreter copies its arguments (not a GPU's behaviour), so it runs on a GPU only."""
    batch, positions, vocab = 2, 33, 3000
    targets = torch.randint(0, vocab, (batch, positions - 1), device=DEVICE)
    full_size = batch * (positions - 1) * vocab * 4  # one [B, L, V] float32 tensor

    _, _, logits = _producer_and_logits(batch, positions, vocab)
    logp, entropy = erpo.logprobs_and_entropy(logits, targets, backend=backend, inplace_grad=True, shift=True)
    assert _largest_allocation_in_backward(logp.sum() + entropy.sum()) < full_size // 4

    # Control: the sliced view allocates one (slice backward's zero buffer), so the detector can see one.
    _, _, logits = _producer_and_logits(batch, positions, vocab)
    logp, entropy = erpo.logprobs_and_entropy(logits[:, :-1], targets, backend=backend, inplace_grad=True)
    assert _largest_allocation_in_backward(logp.sum() + entropy.sum()) >= full_size


@pytest.mark.parametrize("compile_backend", ["aot_eager"])
def test_shift_under_torch_compile_fullgraph(compile_backend):
    logits = make_logits((2, 6, 40), torch.float32)
    targets = torch.randint(0, 40, (2, 5), device=DEVICE)

    def loss_fn(x, t):
        logp, entropy = erpo.logprobs_and_entropy(x, t, shift=True)
        return -logp.mean() - 0.1 * entropy.mean()

    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True, backend=compile_backend)
    results = []
    for fn in (loss_fn, compiled):
        leaf = logits.clone().requires_grad_()
        loss = fn(leaf, targets)
        loss.backward()
        results.append((loss.detach(), leaf.grad))
    assert torch.allclose(results[0][0], results[1][0], rtol=1e-6, atol=1e-7)
    assert torch.equal(results[0][1], results[1][1])


class TestShiftBadInput:
    def test_targets_must_drop_one_position(self):
        logits = torch.randn(2, 5, 30, device=DEVICE)
        with pytest.raises(ValueError, match=r"shift=True.*\(2, 4\)"):
            erpo.logprobs_and_entropy(logits, torch.zeros(2, 5, dtype=torch.long, device=DEVICE), shift=True)

    def test_needs_a_position_dim(self):
        with pytest.raises(ValueError, match="shift=True needs logits"):
            erpo.logprobs_and_entropy(torch.randn(30, device=DEVICE), torch.zeros((), dtype=torch.long,
                                                                                 device=DEVICE), shift=True)

    def test_shift_is_a_bool(self):
        logits = torch.randn(2, 5, 30, device=DEVICE)
        with pytest.raises(TypeError, match="shift must be True or False"):
            erpo.logprobs_and_entropy(logits, torch.zeros(2, 4, dtype=torch.long, device=DEVICE), shift=1)


def test_custom_ops_pass_opcheck_with_shift():
    from erpo.ops.logprobs_entropy import _bwd_op, _fwd_op

    logits = torch.randn(2, 4, 30, device=DEVICE)
    targets = torch.randint(0, 30, (2, 3), device=DEVICE)
    logp, entropy, lse = _fwd_op(logits, targets, 1.25, -100, "torch", False, True)
    torch.library.opcheck(_fwd_op, (logits, targets, 1.25, -100, "torch", False, True))
    torch.library.opcheck(_bwd_op, (logits, targets, lse, entropy, torch.randn(2, 3, device=DEVICE), None, 1.25,
                                    -100, "torch", True))
