"""erpo.linear_logprobs_and_entropy (the fused LM head) against a float64 reference of the materialized
logits, on the torch backend (and the Triton backend once its kernel module exists).

Tolerances: fp32 values are compared relative to the largest reference magnitude at 1e-5, gradients
(hidden, weight, bias) at 1e-4: fp32 accumulation over H and V in a different order than float64.
Low-precision heads are compared with the logits path on the same rounded logits (`hidden @ weight.T` in
that dtype), which is what the fused head promises: the same results as `logprobs_and_entropy` of them.
"""
import importlib.util

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import erpo
from erpo.ops import torch_linear_logprobs_entropy as torch_head
from erpo.ops.linear_logprobs_entropy import _bwd_op, _fwd_op
from erpo.ops.row_layout import addressable_in_place, row_layout
from tests.conftest import DEVICE

HAS_TRITON_HEAD = importlib.util.find_spec("erpo.kernels.linear_logprobs_entropy") is not None
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not HAS_TRITON_HEAD, reason="kernels/linear_logprobs_entropy.py (helper headkernel's module) is not merged yet"))]
VALUE_RTOL, GRAD_RTOL = 1e-5, 1e-4


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch):
    """Chunks of 4 rows: every test with N > 4 crosses chunk edges and a partial last chunk."""
    monkeypatch.setattr(torch_head, "ROWS", 4)


def rel_err(actual, expected):
    scale = max(expected.abs().max().item(), 1e-30)
    return (actual.double() - expected).abs().max().item() / scale


def make_head(shape, hidden_size, vocab, dtype=torch.float32, bias=True, scale=1.0):
    hidden = (torch.randn(*shape, hidden_size, device=DEVICE) * scale).to(dtype)
    weight = (torch.randn(vocab, hidden_size, device=DEVICE) / hidden_size ** 0.5 * 3).to(dtype)
    b = torch.randn(vocab, device=DEVICE).to(dtype) if bias else None
    return hidden, weight, b


def reference(hidden, weight, bias, targets, grad_logp, grad_ent, temperature=1.0, ignore_index=-100):
    """float64 logp, entropy and the gradients of g_logp . logp + g_ent . H from the full log_softmax."""
    leaves = [t.detach().double().requires_grad_() for t in (hidden, weight)]
    b = None if bias is None else bias.detach().double().requires_grad_()
    logits = leaves[0] @ leaves[1].T + (0 if b is None else b)
    logprobs = torch.log_softmax(logits / temperature, dim=-1)
    ignored = targets == ignore_index
    logp = logprobs.gather(-1, torch.where(ignored, 0, targets).unsqueeze(-1)).squeeze(-1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    logp, entropy = logp.masked_fill(ignored, 0.0), entropy.masked_fill(ignored, 0.0)
    ((logp * grad_logp.double()).sum() + (entropy * grad_ent.double()).sum()).backward()
    return logp.detach(), entropy.detach(), [t.grad for t in leaves] + [None if b is None else b.grad]


def fused(hidden, weight, bias, targets, grad_logp, grad_ent, **kwargs):
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight)]
    b = None if bias is None else bias.detach().clone().requires_grad_()
    logp, entropy = erpo.linear_logprobs_and_entropy(leaves[0], leaves[1], targets, b, **kwargs)
    objective = (logp * grad_logp).sum() + (entropy * grad_ent).sum()
    if objective.requires_grad:
        objective.backward()
    return logp, entropy, [t.grad for t in leaves] + [None if b is None else b.grad]


def check_fp32(shape, hidden_size, vocab, backend, bias=True, temperature=1.0, ignored_frac=0.2,
               grad_mix=(1.0, 1.0)):
    hidden, weight, b = make_head(shape, hidden_size, vocab, bias=bias)
    targets = torch.randint(0, vocab, shape, device=DEVICE)
    targets[torch.rand(shape, device=DEVICE) < ignored_frac] = -100
    grad_logp = torch.randn(shape, device=DEVICE) * grad_mix[0]
    grad_ent = torch.randn(shape, device=DEVICE) * grad_mix[1]
    want_logp, want_ent, want_grads = reference(hidden, weight, b, targets, grad_logp, grad_ent, temperature)
    logp, entropy, grads = fused(hidden, weight, b, targets, grad_logp, grad_ent, temperature=temperature,
                                 backend=backend)
    assert logp.dtype == entropy.dtype == torch.float32 and logp.shape == targets.shape
    assert rel_err(logp, want_logp) < VALUE_RTOL and rel_err(entropy, want_ent) < VALUE_RTOL
    for name, got, want in zip(("hidden", "weight", "bias"), grads, want_grads):
        if want is None:
            assert got is None
            continue
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert rel_err(got, want) < GRAD_RTOL, name
    return grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,hidden_size,vocab", [
    ((1,), 1, 1), ((1,), 5, 7), ((13,), 1, 17), ((3, 9), 11, 67), ((29,), 16, 130),
])
def test_fp32_values_and_gradients_match_float64(shape, hidden_size, vocab, backend):
    check_fp32(shape, hidden_size, vocab, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grad_mix", [(1.0, 0.0), (0.0, 1.0)])
def test_each_gradient_term_alone_and_temperature(grad_mix, backend):
    check_fp32((2, 7), 6, 41, backend, temperature=0.6, grad_mix=grad_mix)
    check_fp32((9,), 6, 41, backend, bias=False, temperature=1.7, grad_mix=grad_mix)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_hidden_is_read_in_place_and_matches_a_copy(backend):
    states, weight, b = make_head((3, 8), 10, 23)
    view = states[:, :-1]  # the shifted view a trainer scores: rows not evenly spaced
    assert not view.is_contiguous() and addressable_in_place(view)
    targets = torch.randint(0, 23, (3, 7), device=DEVICE)
    g1, g2 = torch.randn(3, 7, device=DEVICE), torch.randn(3, 7, device=DEVICE)
    leaf = states.detach().clone().requires_grad_()
    logp, entropy = erpo.linear_logprobs_and_entropy(leaf[:, :-1], weight, targets, b, backend=backend)
    ((logp * g1).sum() + (entropy * g2).sum()).backward()
    want_logp, want_ent, (want_gh, _, _) = reference(view.contiguous(), weight, b, targets, g1, g2)
    assert rel_err(logp, want_logp) < VALUE_RTOL and rel_err(entropy, want_ent) < VALUE_RTOL
    assert rel_err(leaf.grad[:, :-1], want_gh) < GRAD_RTOL
    assert leaf.grad[:, -1].abs().max() == 0  # the row outside the view gets no gradient


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_rows_give_zero_and_are_never_read(backend):
    hidden, weight, b = make_head((11,), 5, 19)
    targets = torch.randint(0, 19, (11,), device=DEVICE)
    targets[[0, 4, 5, 10]] = -7
    hidden[[0, 4, 5, 10]] = float("nan")  # garbage in skipped rows (padding) must reach nothing
    g1, g2 = torch.randn(11, device=DEVICE), torch.randn(11, device=DEVICE)
    logp, entropy, (gh, gw, gb) = fused(hidden, weight, b, targets, g1, g2, ignore_index=-7, backend=backend)
    kept = targets != -7
    assert torch.isfinite(logp).all() and torch.isfinite(entropy).all()
    assert (logp[~kept] == 0).all() and (entropy[~kept] == 0).all() and (gh[~kept] == 0).all()
    assert torch.isfinite(gw).all() and torch.isfinite(gb).all() and torch.isfinite(gh).all()
    want_logp, want_ent, want_grads = reference(hidden[kept], weight, b, targets[kept], g1[kept], g2[kept])
    assert rel_err(logp[kept], want_logp) < VALUE_RTOL and rel_err(entropy[kept], want_ent) < VALUE_RTOL
    assert rel_err(gw, want_grads[1]) < GRAD_RTOL and rel_err(gb, want_grads[2]) < GRAD_RTOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_ignored(backend):
    hidden, weight, b = make_head((2, 3), 4, 9)
    targets = torch.full((2, 3), -100, device=DEVICE)
    logp, entropy, grads = fused(hidden, weight, b, targets, torch.randn(2, 3), torch.randn(2, 3), backend=backend)
    assert (logp == 0).all() and (entropy == 0).all()
    assert all(g is not None and (g == 0).all() for g in grads)


def test_nan_row_gives_nan_for_that_row_only():
    hidden, weight, b = make_head((6,), 4, 9, bias=False)
    hidden[2, 1] = float("nan")
    targets = torch.randint(0, 9, (6,), device=DEVICE)
    logp, entropy = erpo.linear_logprobs_and_entropy(hidden, weight, targets)
    assert torch.isnan(logp[2]) and torch.isnan(entropy[2])
    others = torch.arange(6, device=DEVICE) != 2
    assert torch.isfinite(logp[others]).all() and torch.isfinite(entropy[others]).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_matches_the_logits_path_on_the_same_logits(dtype):
    scale = 8.0 if dtype == torch.bfloat16 else 2.0  # bf16: logits of magnitude ~30
    hidden, weight, b = make_head((4, 6), 32, 75, dtype=dtype, scale=scale)
    targets = torch.randint(0, 75, (4, 6), device=DEVICE)
    targets[1, 2] = -100
    g1, g2 = torch.randn(4, 6, device=DEVICE), torch.randn(4, 6, device=DEVICE)
    logp, entropy, (gh, gw, gb) = fused(hidden, weight, b, targets, g1, g2)
    assert gh.dtype == gw.dtype == gb.dtype == dtype
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, b)]
    logits = (leaves[0] @ leaves[1].T).float().add(leaves[2].float())  # fp32 bias add, as the fused head does
    want_logp, want_ent = erpo.logprobs_and_entropy(logits, targets, backend="torch")
    ((want_logp * g1).sum() + (want_ent * g2).sum()).backward()
    assert rel_err(logp, want_logp.double()) < VALUE_RTOL and rel_err(entropy, want_ent.double()) < VALUE_RTOL
    # Both round dlogits to the head's dtype before the gradient matmuls (the fused head per chunk, in a
    # different accumulation order): a few ulps of that dtype.
    ulp = 2 ** -7 if dtype == torch.bfloat16 else 2 ** -10
    for got, leaf in zip((gh, gw, gb), leaves):
        assert rel_err(got, leaf.grad.double()) < 4 * ulp


def test_chunking_from_the_budget_and_override_agree(monkeypatch):
    hidden, weight, b = make_head((37,), 7, 50)
    targets = torch.randint(0, 50, (37,), device=DEVICE)
    g1, g2 = torch.randn(37), torch.randn(37)
    results = []
    for rows, budget in ((1, None), (None, 4 * 50 * 10), (None, 1 << 30)):
        monkeypatch.setattr(torch_head, "ROWS", rows)
        if budget is not None:
            monkeypatch.setitem(torch_head.BUDGET_BYTES, "cpu", budget)
        results.append(fused(hidden, weight, b, targets, g1, g2))
    assert torch_head.chunk_rows(37, 50, torch.device("cpu")) == 37  # the last budget holds all rows
    monkeypatch.setitem(torch_head.BUDGET_BYTES, "cpu", 4 * 50 * 10)
    assert torch_head.chunk_rows(37, 50, torch.device("cpu")) == 10
    for other in results[1:]:
        torch.testing.assert_close(other[0], results[0][0], rtol=1e-6, atol=1e-6)
        for got, want in zip(other[2], results[0][2]):  # sums over chunks in another order: fp32 rounding
            assert rel_err(got, want.double()) < 1e-5


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_never_holds_n_by_v():
    # The probe watches the backend's own ops (inside a custom op a dispatch mode sees only the op itself).
    n, hidden_size, vocab = 64, 3, 50  # N x V = 3200 elements; chunks of 4 rows hold 200
    hidden, weight, b = make_head((n,), hidden_size, vocab)
    targets = torch.randint(0, vocab, (n,), device=DEVICE)
    grads = torch.randn(n, device=DEVICE), torch.randn(n, device=DEVICE)
    with _LargestTensor() as probe:
        logp, entropy, lse = torch_head.forward(row_layout(hidden), weight, b, targets, 1.0, -100)
        torch_head.backward(row_layout(hidden), weight, b, targets, lse, entropy, *grads, 1.0, -100)
        torch_head.forward_backward(row_layout(hidden), weight, b, targets, 1.0, -100, lambda idx, lp, h: (grads[0][idx], grads[1][idx]))
    assert probe.largest == 4 * vocab  # a chunk's logits, the largest tensor: never [N, V]


def test_no_grad_runs_the_forward_only_and_saves_nothing():
    hidden, weight, b = make_head((5,), 4, 9)
    hidden.requires_grad_()
    targets = torch.randint(0, 9, (5,), device=DEVICE)
    with torch.no_grad():
        logp, entropy = erpo.linear_logprobs_and_entropy(hidden, weight, targets, b)
    assert logp.grad_fn is None and entropy.grad_fn is None
    logp, _ = erpo.linear_logprobs_and_entropy(hidden, weight, targets, b)
    assert logp.grad_fn is not None


def test_custom_ops_pass_opcheck():
    hidden, weight, b = make_head((2, 3), 4, 9)
    targets = torch.randint(0, 9, (2, 3), device=DEVICE)
    logp, entropy, lse = _fwd_op(hidden, weight, b, targets, 1.25, -100, "torch", False)
    torch.library.opcheck(_fwd_op, (hidden, weight, b, targets, 1.25, -100, "torch", False))
    torch.library.opcheck(_bwd_op, (hidden, weight, b, targets, lse, entropy, torch.randn(2, 3), None, 1.25, -100,
                                    "torch"))


def test_torch_compile_fullgraph_traces_the_ops():
    hidden, weight, b = make_head((2, 5), 6, 13)
    targets = torch.randint(0, 13, (2, 5), device=DEVICE)

    def step(h, w, bias):
        logp, entropy = erpo.linear_logprobs_and_entropy(h, w, targets, bias, temperature=0.8, check_targets=False)
        return logp.sum() + 0.1 * entropy.sum()

    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, b)]
    eager = [t.detach().clone().requires_grad_() for t in (hidden, weight, b)]
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    compiled(*leaves).backward()
    step(*eager).backward()
    for got, want in zip(leaves, eager):
        torch.testing.assert_close(got.grad, want.grad)


@pytest.mark.parametrize("case,message", [
    ("h_mismatch", "last dim must be the head's H"),
    ("bias_size", "bias must be \\[V\\]"),
    ("weight_1d", "weight must be 2-D"),
    ("target_range", "out of range"),
    ("targets_shape", "targets shape"),
    ("float_targets", "integer token ids"),
    ("dtype_mismatch", "differs from hidden's"),
    ("bias_dtype", "bias dtype"),
    ("float64", "not supported"),
    ("temperature", "temperature must be a finite number > 0"),
    ("backend", "backend must be one of"),
    ("device", "meta"),
])
def test_bad_input_raises_before_any_kernel(case, message):
    hidden, weight, b = make_head((2, 3), 4, 9)
    targets = torch.randint(0, 9, (2, 3), device=DEVICE)
    kwargs = {}
    if case == "h_mismatch":
        hidden = hidden[..., :3]
    elif case == "bias_size":
        b = b[:-1]
    elif case == "weight_1d":
        weight = weight[0]
    elif case == "target_range":
        targets[1, 2] = 9
    elif case == "targets_shape":
        targets = targets[:, :2]
    elif case == "float_targets":
        targets = targets.float()
    elif case == "dtype_mismatch":
        weight = weight.to(torch.bfloat16)
    elif case == "bias_dtype":
        b = b.double()
    elif case == "float64":
        hidden, weight, b = hidden.double(), weight.double(), b.double()
    elif case == "temperature":
        kwargs["temperature"] = 0.0
    elif case == "backend":
        kwargs["backend"] = "cuda"
    elif case == "device":
        weight = weight.to("meta")
    with pytest.raises((ValueError, TypeError), match=message):
        erpo.linear_logprobs_and_entropy(hidden, weight, targets, b, **kwargs)
