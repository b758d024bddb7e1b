"""erpo.logprobs_and_entropy against a float64 log_softmax reference, on every backend.

Tolerances (relative to the largest reference magnitude, floored at 1 for values):
- values (logp, entropy) are accumulated in fp32 for every input dtype and compared with the float64
  reference evaluated on the *same* (already rounded) logits, so only fp32 accumulation error remains:
  ~V * 2^-24 in the worst case, far less in practice; 2e-5 leaves room for V ~ 1e3 and |logits/T| ~ 40.
- gradients are written in the logits' dtype, so they also carry one rounding of that dtype:
  fp32 2e-5 as above, bf16 2^-8 ~ 4e-3, fp16 2^-11 ~ 5e-4 (one ulp, the kernel rounds once at the store).
  Exception: the Triton *interpreter* converts fp32 -> bf16 by truncation (its round-to-nearest path is
  not used by a plain `.to()`), which costs up to 2^-7 ~ 7.8e-3; on a GPU the same `.to()` rounds to
  nearest even and the 4e-3 bound applies.
"""
import os

import pytest
import torch

import erpo
from erpo.ops import torch_logprobs_entropy
from erpo.ops.row_layout import row_layout
from tests.conftest import DEVICE, KERNEL_BACKENDS

BACKENDS = ["torch"] + KERNEL_BACKENDS
VALUE_RTOL = 2e-5
GRAD_RTOL = {torch.float32: 2e-5, torch.bfloat16: 4e-3, torch.float16: 1e-3, torch.float64: 1e-12}


@pytest.fixture(autouse=True)
def _small_triton_blocks(monkeypatch):
    """Blocks of 64 lanes make every V > 64 take several loop steps (rescaled running max, masked tail),
    and keep the interpreter fast."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        import erpo.kernels.logprobs_entropy as triton_kernels

        monkeypatch.setattr(triton_kernels, "MAX_BLOCK_V", 64)


def reference(logits, targets, temperature=1.0, ignore_index=-100):
    """float64 logp and entropy from a full log_softmax: the definition, written for clarity."""
    logprobs = torch.log_softmax(logits.double() / temperature, dim=-1)
    ignored = targets == ignore_index
    safe = torch.where(ignored, 0, targets).long()
    logp = logprobs.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    probs = logprobs.exp()
    entropy = -(torch.where(probs > 0, probs * logprobs, torch.zeros_like(probs))).sum(-1)
    zero = torch.zeros_like(logp)
    return torch.where(ignored, zero, logp), torch.where(ignored, zero, entropy)


def rel_err(actual, expected, floor=0.0):
    scale = max(expected.abs().max().item(), floor)
    return (actual.double() - expected).abs().max().item() / max(scale, 1e-30)


def make_logits(shape, dtype, scale=4.0):
    return (torch.randn(shape, device=DEVICE) * scale).to(dtype)


def check_values_and_grads(logits, targets, backend, temperature=1.0, ignore_index=-100, grad_mix=(1.0, 1.0)):
    """Compare values and the gradient of g_logp . logp + g_ent . entropy (random upstream grads)."""
    leaf = logits.detach().clone().requires_grad_()
    logp, entropy = erpo.logprobs_and_entropy(leaf, targets, temperature, ignore_index, backend=backend)
    assert logp.dtype == entropy.dtype == (torch.float64 if logits.dtype == torch.float64 else torch.float32)
    ref_leaf = logits.detach().double().requires_grad_()
    ref_logp, ref_entropy = reference(ref_leaf, targets, temperature, ignore_index)
    assert rel_err(logp, ref_logp, 1.0) < VALUE_RTOL
    assert rel_err(entropy, ref_entropy, 1.0) < VALUE_RTOL

    g_logp = torch.randn_like(ref_logp) * grad_mix[0]
    g_ent = torch.randn_like(ref_entropy) * grad_mix[1]
    outputs = [o for o, w in zip((logp, entropy), grad_mix) if w]
    ref_outputs = [o for o, w in zip((ref_logp, ref_entropy), grad_mix) if w]
    grads = [g for g, w in zip((g_logp, g_ent), grad_mix) if w]
    torch.autograd.backward(outputs, [g.to(o.dtype) for g, o in zip(grads, outputs)])
    torch.autograd.backward(ref_outputs, grads)
    assert leaf.grad.dtype == logits.dtype
    tolerance = GRAD_RTOL[logits.dtype]
    if backend == "triton" and logits.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        tolerance = 2.0**-7
    assert rel_err(leaf.grad, ref_leaf.grad) < tolerance
    return leaf.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n_rows,vocab", [(1, 1), (1, 37), (5, 64), (7, 300)])
def test_matches_float64_reference(backend, dtype, n_rows, vocab):
    logits = make_logits((n_rows, vocab), dtype)
    targets = torch.randint(0, vocab, (n_rows,), device=DEVICE)
    check_values_and_grads(logits, targets, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grad_mix", [(1.0, 0.0), (0.0, 1.0), (0.7, -0.3)], ids=["logp", "entropy", "mix"])
def test_gradient_through_either_output(backend, grad_mix):
    logits = make_logits((6, 200), torch.float32)
    targets = torch.randint(0, 200, (6,), device=DEVICE)
    check_values_and_grads(logits, targets, backend, grad_mix=grad_mix)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [0.6, 1.7])
def test_temperature(backend, temperature):
    logits = make_logits((4, 150), torch.float32)
    targets = torch.randint(0, 150, (4,), device=DEVICE)
    check_values_and_grads(logits, targets, backend, temperature=temperature)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_large_magnitude(backend):
    """bf16 logits of magnitude ~30 (peaked rows): everything relative to the running max, so no precision
    is lost to the large offset."""
    logits = make_logits((6, 257), torch.bfloat16, scale=1.0) + 30.0
    logits[:, 5] += 12.0  # a dominant token: p near 1, most p underflow-small
    targets = torch.randint(0, 257, (6,), device=DEVICE)
    targets[0] = 5
    check_values_and_grads(logits, targets, backend, temperature=0.9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_rows_without_copy(backend):
    """The shifted view of HF logits, hidden[:, :-1, :], has rows that are not evenly spaced."""
    hidden = make_logits((3, 6, 130), torch.float32)
    logits = hidden[:, :-1, :]
    assert not logits.is_contiguous()
    assert row_layout(logits).tensor is logits  # addressed in place: the kernels read the view itself
    targets = torch.randint(0, 130, (3, 5), device=DEVICE)
    check_values_and_grads(logits, targets, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_targets(backend):
    """targets[::2] stays a strided view after reshape(-1): the kernels must not read it as contiguous."""
    logits = make_logits((4, 50), torch.float32)
    check_values_and_grads(logits, torch.randint(0, 50, (8,), device=DEVICE)[::2], backend)
    check_values_and_grads(logits, torch.randint(0, 50, (4, 3), device=DEVICE, dtype=torch.int32)[:, 1], backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vocab_slice_and_unmergeable_layouts(backend):
    vocab_slice = make_logits((4, 3, 170), torch.float32)[..., :150]  # row stride 170, not V
    targets = torch.randint(0, 150, (4, 3), device=DEVICE)
    check_values_and_grads(vocab_slice, targets, backend)
    # Three leading levels that do not merge: copied once, still correct.
    nested = make_logits((2, 4, 3, 90), torch.float32)[:, :-1, :-1]
    assert row_layout(nested).tensor is not nested
    check_values_and_grads(nested, torch.randint(0, 90, (2, 3, 2), device=DEVICE), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignore_index_rows(backend):
    logits = make_logits((6, 120), torch.float32)
    targets = torch.randint(0, 120, (6,), device=DEVICE)
    targets[[1, 4]] = -100
    grad = check_values_and_grads(logits, targets, backend)
    assert torch.all(grad[[1, 4]] == 0)
    logp, entropy = erpo.logprobs_and_entropy(logits, targets, backend=backend)
    assert torch.all(logp[[1, 4]] == 0) and torch.all(entropy[[1, 4]] == 0)
    custom = targets.clone()
    custom[[1, 4]] = 7_777
    check_values_and_grads(logits, custom, backend, ignore_index=7_777)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_vocabulary_minus_inf(backend):
    """-inf entries get p = 0, finite outputs and exactly zero gradient; tiny p never gives 0 * -inf.

    The float64 reference runs on the finite columns only (the -inf ones carry p = 0 exactly, so the
    distribution is the same): log_softmax itself returns NaN gradients at -inf, the bug this op avoids.
    """
    logits = make_logits((5, 140), torch.float32)
    logits[:, 100:] = float("-inf")
    logits[2, :50] = -1e4  # p underflows to 0 in fp32 for these finite entries
    targets = torch.randint(50, 100, (5,), device=DEVICE)
    leaf = logits.clone().requires_grad_()
    logp, entropy = erpo.logprobs_and_entropy(leaf, targets, backend=backend)
    ref_leaf = logits[:, :100].double().requires_grad_()
    ref_logp, ref_entropy = reference(ref_leaf, targets)
    assert rel_err(logp, ref_logp, 1.0) < VALUE_RTOL and rel_err(entropy, ref_entropy, 1.0) < VALUE_RTOL
    g_logp, g_ent = torch.randn_like(ref_logp), torch.randn_like(ref_entropy)
    torch.autograd.backward([logp, entropy], [g_logp.float(), g_ent.float()])
    torch.autograd.backward([ref_logp, ref_entropy], [g_logp, g_ent])
    assert torch.isfinite(leaf.grad).all()
    assert torch.all(leaf.grad[:, 100:] == 0)
    assert rel_err(leaf.grad[:, :100], ref_leaf.grad) < GRAD_RTOL[torch.float32]


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_rows_stay_in_their_row(backend):
    """A row with NaN, +inf or only -inf gives non-finite outputs for that row only."""
    logits = make_logits((5, 90), torch.float32)
    logits[1, 3] = float("nan")
    logits[2, 7] = float("inf")
    logits[3] = float("-inf")
    targets = torch.randint(0, 90, (5,), device=DEVICE)
    leaf = logits.clone().requires_grad_()
    logp, entropy = erpo.logprobs_and_entropy(leaf, targets, backend=backend)
    bad = [1, 2, 3]
    assert not torch.isfinite(logp[bad]).any() and not torch.isfinite(entropy[bad]).any()
    good = [0, 4]
    ref_logp, ref_entropy = reference(logits[good], targets[good])
    assert rel_err(logp[good], ref_logp, 1.0) < VALUE_RTOL
    assert rel_err(entropy[good], ref_entropy, 1.0) < VALUE_RTOL
    (logp[good].sum() + entropy[good].sum()).backward()
    assert torch.isfinite(leaf.grad[good]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_grad_equals_normal_path(backend):
    hidden = make_logits((3, 5, 110), torch.bfloat16).requires_grad_()
    targets = torch.randint(0, 110, (3, 4), device=DEVICE)
    g_logp, g_ent = torch.randn(3, 4, device=DEVICE), torch.randn(3, 4, device=DEVICE)

    def run(inplace):
        hidden.grad = None
        logits = hidden * 1.0  # a non-leaf whose producer does not save its output
        logits.retain_grad()
        view = logits[:, :-1]
        logp, entropy = erpo.logprobs_and_entropy(view, targets, inplace_grad=inplace, backend=backend)
        torch.autograd.backward([logp, entropy], [g_logp, g_ent])
        return hidden.grad.clone(), logits

    expected, _ = run(False)
    actual, logits = run(True)
    assert torch.equal(actual, expected)
    # The gradient really lives in the logits' storage: it overwrote them.
    assert torch.equal(logits.detach()[:, :-1], expected[:, :-1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_grad_on_a_layout_the_kernels_cannot_address(backend):
    """Leading dims that do not merge into two strides are copied for the kernels: the gradient then cannot
    live in the logits' storage and must come back in a buffer of its own, still equal to the normal path."""
    hidden = make_logits((2, 4, 3, 90), torch.float32).requires_grad_()
    targets = torch.randint(0, 90, (2, 3, 2), device=DEVICE)
    grads = []
    for inplace in (False, True):
        hidden.grad = None
        logits = (hidden * 1.0)[:, :-1, :-1]
        logp, entropy = erpo.logprobs_and_entropy(logits, targets, inplace_grad=inplace, backend=backend)
        (logp.sum() - 0.5 * entropy.sum()).backward()
        grads.append(hidden.grad.clone())
    assert grads[0].abs().sum() > 0
    assert torch.equal(grads[1], grads[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_grad_refuses_leaf_and_detects_other_readers(backend):
    leaf = make_logits((2, 50), torch.float32).requires_grad_()
    targets = torch.randint(0, 50, (2,), device=DEVICE)
    with pytest.raises(ValueError, match="leaf"):
        erpo.logprobs_and_entropy(leaf, targets, inplace_grad=True, backend=backend)
    # exp saves its output for backward; overwriting it in place must be caught by autograd, not trained on.
    logits = leaf.exp()
    logp, _ = erpo.logprobs_and_entropy(logits, targets, inplace_grad=True, backend=backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        logp.sum().backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_inference_path_saves_nothing(backend):
    logits = make_logits((4, 80), torch.float32).requires_grad_()
    targets = torch.randint(0, 80, (4,), device=DEVICE)
    with torch.no_grad():
        logp, entropy = erpo.logprobs_and_entropy(logits, targets, backend=backend)
    assert logp.grad_fn is None and entropy.grad_fn is None
    ref_logp, ref_entropy = reference(logits.detach(), targets)
    assert rel_err(logp, ref_logp, 1.0) < VALUE_RTOL and rel_err(entropy, ref_entropy, 1.0) < VALUE_RTOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_int32_targets_and_empty_input(backend):
    logits = make_logits((4, 70), torch.float32)
    targets = torch.randint(0, 70, (4,), device=DEVICE, dtype=torch.int32)
    check_values_and_grads(logits, targets, backend)
    empty = make_logits((0, 70), torch.float32).requires_grad_()
    logp, entropy = erpo.logprobs_and_entropy(empty, targets[:0], backend=backend)
    assert logp.shape == (0,)
    (logp.sum() + entropy.sum()).backward()
    assert empty.grad.shape == (0, 70)


def test_torch_backend_float64_and_large_vocab(monkeypatch):
    logits = make_logits((3, 50_000), torch.float64)
    targets = torch.randint(0, 50_000, (3,), device=DEVICE)
    check_values_and_grads(logits, targets, "torch")
    # Several chunks per call, both ways of cutting them (whole outer slices, and pieces of one slice).
    monkeypatch.setattr(torch_logprobs_entropy, "CHUNK_ELEMENTS", 400)
    hidden = make_logits((3, 7, 130), torch.float32)
    check_values_and_grads(hidden[:, :-1], torch.randint(0, 130, (3, 6), device=DEVICE), "torch")
    monkeypatch.setattr(torch_logprobs_entropy, "CHUNK_ELEMENTS", 130 * 13)
    check_values_and_grads(hidden[:, :-1], torch.randint(0, 130, (3, 6), device=DEVICE), "torch")


def test_backends_agree_bitwise_close():
    """The Triton kernel and the torch backend implement one formula: compare them directly too."""
    logits = make_logits((9, 333), torch.float32, scale=8.0)
    targets = torch.randint(0, 333, (9,), device=DEVICE)
    outs = {}
    for backend in BACKENDS:
        leaf = logits.clone().requires_grad_()
        logp, entropy = erpo.logprobs_and_entropy(leaf, targets, temperature=1.3, backend=backend)
        (logp.sum() - 0.5 * entropy.sum()).backward()
        outs[backend] = (logp, entropy, leaf.grad.float())
    base = outs["torch"]
    for backend, out in outs.items():
        for a, b in zip(out, base):
            assert rel_err(a, b.double(), 1.0) < 1e-5, backend


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compile_backend, tmp_path, monkeypatch):
    """A loss calling the op compiles as one graph (custom ops are opaque to dynamo) and matches eager."""
    # A private inductor cache: other processes compiling at the same time cannot interfere with this one.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    logits = make_logits((2, 5, 60), torch.float32)
    targets = torch.randint(0, 60, (2, 5), device=DEVICE)
    advantages = torch.randn(2, 5, device=DEVICE)

    def loss_fn(x, t, a):
        logp, entropy = erpo.logprobs_and_entropy(x, t, temperature=0.8)
        return -(logp * a).mean() - 0.01 * entropy.mean()

    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True, backend=compile_backend)
    results = []
    for fn in (loss_fn, compiled):
        leaf = logits.clone().requires_grad_()
        loss = fn(leaf, targets, advantages)
        loss.backward()
        results.append((loss.detach(), leaf.grad))
    assert torch.allclose(results[0][0], results[1][0], rtol=1e-6, atol=1e-7)
    assert torch.allclose(results[0][1], results[1][1], rtol=1e-5, atol=1e-8)


class TestBadInput:
    def setup_method(self):
        self.logits = torch.randn(4, 30, device=DEVICE)
        self.targets = torch.randint(0, 30, (4,), device=DEVICE)

    @pytest.mark.parametrize("backend", BACKENDS)
    def test_targets_out_of_range(self, backend):
        for bad in (30, 1_000, -1):
            targets = self.targets.clone()
            targets[2] = bad
            with pytest.raises(ValueError, match=rf"target id {bad} at flat position 2 is out of range \[0, 30\)"):
                erpo.logprobs_and_entropy(self.logits, targets, backend=backend)

    def test_shape_mismatch(self):
        with pytest.raises(ValueError, match="targets shape"):
            erpo.logprobs_and_entropy(self.logits, self.targets[:3])
        with pytest.raises(ValueError, match=r"\[\.\.\., V\] with V >= 1"):
            erpo.logprobs_and_entropy(torch.randn(4, 0), self.targets)

    def test_dtypes(self):
        with pytest.raises(TypeError, match="integer token ids"):
            erpo.logprobs_and_entropy(self.logits, self.targets.float())
        with pytest.raises(TypeError, match="logits dtype torch.int64"):
            erpo.logprobs_and_entropy(self.targets.unsqueeze(-1).repeat(1, 3), self.targets)
        with pytest.raises(TypeError, match="float64 is not supported by backend='triton'"):
            erpo.logprobs_and_entropy(self.logits.double(), self.targets, backend="triton")

    def test_devices(self):
        with pytest.raises(ValueError, match="logits are on"):
            erpo.logprobs_and_entropy(self.logits, self.targets.to("meta"))

    @pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf")])
    def test_temperature(self, temperature):
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            erpo.logprobs_and_entropy(self.logits, self.targets, temperature=temperature)
        with pytest.raises(TypeError, match="temperature must be a Python number"):
            erpo.logprobs_and_entropy(self.logits, self.targets, temperature=torch.tensor(1.0))

    def test_backend_names_and_availability(self, monkeypatch):
        with pytest.raises(ValueError, match="backend must be one of"):
            erpo.logprobs_and_entropy(self.logits, self.targets, backend="numpy")
        if DEVICE == "cpu":
            monkeypatch.delenv("TRITON_INTERPRET")
            with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
                erpo.logprobs_and_entropy(self.logits, self.targets, backend="triton")
            with pytest.raises(ValueError, match="needs CUDA tensors"):
                erpo.logprobs_and_entropy(self.logits, self.targets, backend="cuda")

    def test_check_targets_can_be_skipped(self):
        logp, _ = erpo.logprobs_and_entropy(self.logits, self.targets, check_targets=False)
        ref_logp, _ = reference(self.logits, self.targets)
        assert rel_err(logp, ref_logp, 1.0) < VALUE_RTOL

    def test_unchecked_out_of_range_target_never_reads_outside_the_row(self):
        """With the check skipped, a bad id must still not read foreign memory: the kernel gives NaN."""
        targets = self.targets.clone()
        targets[1] = 10_000
        logp, _ = erpo.logprobs_and_entropy(self.logits, targets, check_targets=False, backend="triton")
        assert torch.isnan(logp[1]) and torch.isfinite(logp[[0, 2, 3]]).all()
