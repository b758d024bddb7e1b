"""Soft-capping, a logit scale and the fp32 head (issue 26 item 1) in both fused paths, torch and Triton.

The softmax is that of x = c tanh(s y / c) / T (x = s y / T without a cap), y the logits (or hidden @ W.T + b).
Every check is against a float64 reference of that formula (rel 1e-5 on values, 1e-4 on gradients, relative to
the largest reference magnitude), with logits large enough that the cap bites (|s y| up to ~3c), so a kernel that
ignored the cap, the scale or the chain rule through tanh would fail by orders of magnitude. bf16 inputs: the
float32 gradients the backends compute are checked at 1e-4 (the autograd outputs are those rounded to bf16).
"""
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import erpo
from erpo.kernels import linear_logprobs_entropy as triton_head
from erpo.kernels import logprobs_entropy as triton_op
from erpo.ops import row_stats, torch_linear_logprobs_entropy as torch_head, torch_logprobs_entropy as torch_op
from erpo.ops.row_layout import row_layout
from tests.conftest import DEVICE

VALUE_RTOL, GRAD_RTOL = 1e-5, 1e-4
BACKENDS = ["torch", "triton"]
# (softcap, logit_scale): Gemma 2's final cap, a Cohere-style scale, both, a cap below 1 and a scale above 1.
TRANSFORMS = [(30.0, 1.0), (None, 0.0625), (5.0, 0.5), (0.7, 1.0), (None, 2.5)]
IGNORE = -100


@pytest.fixture(autouse=True)
def _small_blocks(monkeypatch):
    """Blocks / chunks small enough that every test crosses block edges and the rebasing runs."""
    monkeypatch.setattr(triton_op, "MAX_BLOCK_V", 64)
    monkeypatch.setattr(torch_head, "ROWS", 4)


def rel_err(actual, expected, floor=1.0):
    """Relative to the largest reference magnitude, at least `floor`: V = 1 has logp = 0 and no gradient, where
    the error is that of the logits' scale (values) or of p = 1 (gradients), both O(1)."""
    scale = max(expected.abs().max().item(), floor)
    return (actual.double() - expected).abs().max().item() / scale


def grad_err(actual, expected):
    return rel_err(actual, expected, floor=0.1)


def transformed(y, softcap, logit_scale, temperature):
    z = y * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def reference(logits, targets, softcap, logit_scale, temperature, g_logp, g_ent):
    """float64 (logp, entropy, dlogits) of g_logp . logp + g_ent . H."""
    y = logits.detach().double().requires_grad_()
    logprobs = torch.log_softmax(transformed(y, softcap, logit_scale, temperature), dim=-1)
    ignored = targets == IGNORE
    logp = logprobs.gather(-1, torch.where(ignored, 0, targets).unsqueeze(-1)).squeeze(-1).masked_fill(ignored, 0.0)
    entropy = (-(logprobs.exp() * logprobs).sum(-1)).masked_fill(ignored, 0.0)
    ((logp * g_logp.double()).sum() + (entropy * g_ent.double()).sum()).backward()
    return logp.detach(), entropy.detach(), y.grad


def make_case(n_rows, vocab, dtype, softcap, logit_scale):
    # |s y| up to ~3c: the cap is far from linear there (tanh(3) = 0.995)
    # Under a cap the logits reach 3 caps, so the cap bites. Without one they stay within |x| ~ 30 (the range the
    # fused op is held to elsewhere): beyond it the float32 lse saved for the backward (ulp 7.6e-6 at 80) limits the
    # gradient of near-one-hot rows to ~3e-4 relative, a known limit of the saved state, not of the transform.
    reach = 3.0 * (softcap if softcap is not None else 4.0) / max(abs(logit_scale), 1e-3)
    logits = (torch.randn(n_rows, vocab, device=DEVICE) * reach / 2).to(dtype)
    targets = torch.randint(0, vocab, (n_rows,), device=DEVICE)
    if n_rows > 2:
        targets[1] = IGNORE
    return logits, targets, torch.randn(n_rows, device=DEVICE), torch.randn(n_rows, device=DEVICE)


# ---- the logits op --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_rows,vocab", [(1, 1), (1, 37), (6, 301)])
@pytest.mark.parametrize("softcap,logit_scale", TRANSFORMS)
def test_op_matches_float64(backend, dtype, n_rows, vocab, softcap, logit_scale):
    temperature = 0.7
    logits, targets, g_logp, g_ent = make_case(n_rows, vocab, dtype, softcap, logit_scale)
    want_logp, want_ent, want_grad = reference(logits, targets, softcap, logit_scale, temperature, g_logp, g_ent)
    leaf = logits.clone().requires_grad_()
    logp, entropy = erpo.logprobs_and_entropy(leaf, targets, temperature=temperature, backend=backend,
                                              softcap=softcap, logit_scale=logit_scale)
    assert rel_err(logp, want_logp) < VALUE_RTOL and rel_err(entropy, want_ent) < VALUE_RTOL
    ((logp * g_logp).sum() + (entropy * g_ent).sum()).backward()
    assert leaf.grad.dtype == dtype
    # The backend's float32 gradient (before any rounding to the logits' dtype), and the autograd one.
    grad32 = torch.empty(logits.shape, dtype=torch.float32, device=DEVICE)
    layout = row_layout(logits)
    _, _, lse = (torch_op if backend == "torch" else triton_op).forward(layout, targets, 1 / temperature, IGNORE,
                                                                         logit_scale=logit_scale, softcap=softcap)
    (torch_op if backend == "torch" else triton_op).backward(
        layout, targets, lse, entropy.detach(), g_logp, g_ent, 1 / temperature, IGNORE, row_layout(grad32),
        logit_scale=logit_scale, softcap=softcap)
    assert grad_err(grad32, want_grad) < GRAD_RTOL
    assert grad_err(leaf.grad, want_grad) < (GRAD_RTOL if dtype == torch.float32 else 2 ** -7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grad_mix", [(1.0, 0.0), (0.0, 1.0)], ids=["logp", "entropy"])
def test_op_gradient_through_either_output(backend, grad_mix):
    logits, targets, g_logp, g_ent = make_case(5, 129, torch.float32, 4.0, 1.3)
    g_logp, g_ent = g_logp * grad_mix[0], g_ent * grad_mix[1]
    _, _, want = reference(logits, targets, 4.0, 1.3, 1.0, g_logp, g_ent)
    leaf = logits.clone().requires_grad_()
    logp, entropy = erpo.logprobs_and_entropy(leaf, targets, backend=backend, softcap=4.0, logit_scale=1.3)
    (logp if grad_mix[0] else entropy).backward((g_logp if grad_mix[0] else g_ent))
    assert grad_err(leaf.grad, want) < GRAD_RTOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_op_split_rows_and_inplace_grad(backend, monkeypatch):
    """The Triton split-over-V path (partial states merged) and the in-place gradient, under a cap."""
    monkeypatch.setattr(triton_op, "SPLIT_BELOW_ROWS", 1000)
    monkeypatch.setattr(triton_op, "MIN_CHUNK", 64)
    logits, targets, g_logp, g_ent = make_case(3, 700, torch.float32, 30.0, 1.0)
    want_logp, want_ent, want_grad = reference(logits, targets, 30.0, 1.0, 1.2, g_logp, g_ent)
    base = logits.clone().requires_grad_()
    x = base * 1.0  # not a leaf: the gradient may overwrite its storage
    logp, entropy = erpo.logprobs_and_entropy(x, targets, temperature=1.2, backend=backend, softcap=30.0,
                                              inplace_grad=True)
    assert rel_err(logp, want_logp) < VALUE_RTOL and rel_err(entropy, want_ent) < VALUE_RTOL
    ((logp * g_logp).sum() + (entropy * g_ent).sum()).backward()
    assert grad_err(base.grad, want_grad) < GRAD_RTOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_op_shift_and_strided_rows(backend):
    logits = torch.randn(2, 6, 97, device=DEVICE) * 20
    targets = torch.randint(0, 97, (2, 5), device=DEVICE)
    g_logp, g_ent = torch.randn(2, 5, device=DEVICE), torch.randn(2, 5, device=DEVICE)
    want_logp, want_ent, want_grad = reference(logits[:, :-1].reshape(-1, 97), targets.reshape(-1), 10.0, 2.0, 1.0,
                                               g_logp.reshape(-1), g_ent.reshape(-1))
    leaf = logits.clone().requires_grad_()
    logp, entropy = erpo.logprobs_and_entropy(leaf, targets, backend=backend, shift=True, softcap=10.0,
                                              logit_scale=2.0)
    assert rel_err(logp.reshape(-1), want_logp) < VALUE_RTOL
    assert rel_err(entropy.reshape(-1), want_ent) < VALUE_RTOL
    ((logp * g_logp).sum() + (entropy * g_ent).sum()).backward()
    assert grad_err(leaf.grad[:, :-1].reshape(-1, 97), want_grad) < GRAD_RTOL
    assert torch.all(leaf.grad[:, -1] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_op_cap_reaches_infinite_logits_as_the_model_does(backend):
    """Under a cap, -inf becomes -c (what the model computes: c tanh(-inf) = -c), not a masked entry."""
    logits = torch.randn(2, 40, device=DEVICE)
    logits[:, 5] = -math.inf
    targets = torch.tensor([3, 7], device=DEVICE)
    logp, entropy = erpo.logprobs_and_entropy(logits, targets, backend=backend, softcap=2.0)
    want_logp, want_ent, _ = reference(logits.nan_to_num(neginf=-1e30), targets, 2.0, 1.0, 1.0,
                                       torch.zeros(2), torch.zeros(2))
    assert rel_err(logp, want_logp) < VALUE_RTOL and rel_err(entropy, want_ent) < VALUE_RTOL


def test_defaults_are_the_plain_head_bit_for_bit():
    """softcap=None, logit_scale=1.0 take the plain head's arithmetic: the scalars are exactly 1 / T, no
    HAS_SOFTCAP variant, and explicit defaults give the same bits as omitting them (both paths, both backends)."""
    tr = row_stats.logit_transform(1 / 0.7)
    assert tr == row_stats.LogitTransform(1 / 0.7, 1.0, 1 / 0.7, False)
    logits, targets, g_logp, g_ent = make_case(5, 77, torch.float32, None, 1.0)
    for backend in BACKENDS:
        results = []
        for kwargs in ({}, {"softcap": None, "logit_scale": 1.0}):
            leaf = logits.clone().requires_grad_()
            logp, entropy = erpo.logprobs_and_entropy(leaf, targets, temperature=0.7, backend=backend, **kwargs)
            ((logp * g_logp).sum() + (entropy * g_ent).sum()).backward()
            results.append((logp, entropy, leaf.grad))
        assert all(torch.equal(a, b) for a, b in zip(*results))


# ---- the fused head -------------------------------------------------------------------------------------------

def head_case(n_rows, hidden_size, vocab, dtype, softcap, logit_scale, weight_dtype=None):
    # Under a cap the logits reach 3 caps, so the cap bites. Without one they stay within |x| ~ 30 (the range the
    # fused op is held to elsewhere): beyond it the float32 lse saved for the backward (ulp 7.6e-6 at 80) limits the
    # gradient of near-one-hot rows to ~3e-4 relative, a known limit of the saved state, not of the transform.
    reach = 3.0 * (softcap if softcap is not None else 4.0) / max(abs(logit_scale), 1e-3)
    hidden = torch.randn(n_rows, hidden_size, device=DEVICE).to(dtype)
    weight = (torch.randn(vocab, hidden_size, device=DEVICE) * reach / 2 / hidden_size ** 0.5).to(
        weight_dtype or dtype)
    bias = torch.randn(vocab, device=DEVICE).to(weight_dtype or dtype)
    targets = torch.randint(0, vocab, (n_rows,), device=DEVICE)
    if n_rows > 2:
        targets[1] = IGNORE
    return hidden, weight, bias, targets, torch.randn(n_rows, device=DEVICE), torch.randn(n_rows, device=DEVICE)


def head_reference(hidden, weight, bias, targets, softcap, logit_scale, temperature, g_logp, g_ent):
    leaves = [t.detach().double().requires_grad_() for t in (hidden, weight, bias)]
    y = leaves[0] @ leaves[1].T + leaves[2]
    logprobs = torch.log_softmax(transformed(y, softcap, logit_scale, temperature), dim=-1)
    ignored = targets == IGNORE
    logp = logprobs.gather(-1, torch.where(ignored, 0, targets).unsqueeze(-1)).squeeze(-1).masked_fill(ignored, 0.0)
    entropy = (-(logprobs.exp() * logprobs).sum(-1)).masked_fill(ignored, 0.0)
    ((logp * g_logp.double()).sum() + (entropy * g_ent.double()).sum()).backward()
    return logp.detach(), entropy.detach(), [t.grad for t in leaves]


def _module(backend):
    return torch_head if backend == "torch" else triton_head


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,head_fp32", [(torch.float32, False), (torch.bfloat16, True)],
                         ids=["fp32", "bf16-fp32head"])
@pytest.mark.parametrize("n_rows,vocab", [(1, 1), (1, 37), (9, 301)])
@pytest.mark.parametrize("softcap,logit_scale", TRANSFORMS)
def test_head_matches_float64(backend, dtype, head_fp32, n_rows, vocab, softcap, logit_scale):
    temperature = 0.8
    hidden, weight, bias, targets, g_logp, g_ent = head_case(n_rows, 24, vocab, dtype, softcap, logit_scale)
    want_logp, want_ent, want_grads = head_reference(hidden, weight, bias, targets, softcap, logit_scale,
                                                     temperature, g_logp, g_ent)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    logp, entropy = erpo.linear_logprobs_and_entropy(leaves[0], leaves[1], targets, leaves[2],
                                                     temperature=temperature, backend=backend, softcap=softcap,
                                                     logit_scale=logit_scale, head_fp32=head_fp32)
    assert rel_err(logp, want_logp) < VALUE_RTOL and rel_err(entropy, want_ent) < VALUE_RTOL
    ((logp * g_logp).sum() + (entropy * g_ent).sum()).backward()
    for leaf, want in zip(leaves, want_grads):
        assert leaf.grad.dtype == leaf.dtype
        assert grad_err(leaf.grad, want) < (GRAD_RTOL if dtype == torch.float32 else 2 ** -7)
    # The backend's float32 gradients themselves at 1e-4 (bf16: before the rounding to the inputs' dtype).
    mod, kwargs = _module(backend), dict(logit_scale=logit_scale, softcap=softcap, head_fp32=head_fp32)
    _, _, lse = mod.forward(row_layout(hidden), weight, bias, targets, 1 / temperature, IGNORE, **kwargs)
    grads32 = mod.backward(row_layout(hidden), weight, bias, targets, lse, entropy.detach(), g_logp, g_ent,
                           1 / temperature, IGNORE, **kwargs)
    for got, want in zip(grads32, want_grads):
        assert got.dtype == torch.float32 and grad_err(got, want) < GRAD_RTOL


def test_head_one_pass_forward_backward_under_a_cap():
    """The torch head's one-pass schedule (linear_policy_loss's) takes the cap and the chain rule too."""
    hidden, weight, bias, targets, g_logp, g_ent = head_case(10, 16, 203, torch.float32, 6.0, 0.75)
    _, _, want = head_reference(hidden, weight, bias, targets, 6.0, 0.75, 1.1, g_logp, g_ent)
    out = torch_head.forward_backward(row_layout(hidden), weight, bias, targets, 1 / 1.1, IGNORE,
                                      lambda idx, lp, h: (g_logp[idx], g_ent[idx]), logit_scale=0.75, softcap=6.0)
    for got, w in zip(out[3:], want):
        assert grad_err(got, w) < GRAD_RTOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_head_is_fp32(backend):
    """bf16 hidden and weight: head_fp32 gives the float64 values of the bf16 inputs to 1e-5; the 16-bit head
    does not (its products feed 16-bit dots, or 16-bit logits on torch): the flag changes what is computed."""
    hidden, weight, bias, targets, g_logp, g_ent = head_case(12, 64, 301, torch.bfloat16, None, 1.0)
    want_logp, want_ent, want_grads = head_reference(hidden, weight, bias, targets, None, 1.0, 1.0, g_logp, g_ent)
    mod = _module(backend)
    errors = {}
    for fp32 in (False, True):
        logp, entropy, lse = mod.forward(row_layout(hidden), weight, bias, targets, 1.0, IGNORE, head_fp32=fp32)
        grads = mod.backward(row_layout(hidden), weight, bias, targets, lse, entropy, g_logp, g_ent, 1.0, IGNORE,
                             head_fp32=fp32)
        errors[fp32] = (rel_err(logp, want_logp), max(grad_err(g, w) for g, w in zip(grads, want_grads)))
    assert errors[True][0] < VALUE_RTOL and errors[True][1] < GRAD_RTOL
    assert errors[False][1] > 10 * GRAD_RTOL  # 16-bit dlogits in the gradient products
    if backend == "torch":
        assert errors[False][0] > 10 * VALUE_RTOL  # 16-bit logits


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_head_over_a_bf16_backbone_and_an_fp32_weight(backend):
    """TRL's cast_lm_head_to_fp32 leaves an fp32 weight under bf16 hidden states: head_fp32 takes the mix, each
    gradient in its input's dtype; without it the mix is refused in one line."""
    hidden, weight, bias, targets, g_logp, g_ent = head_case(7, 32, 99, torch.bfloat16, 30.0, 1.0,
                                                             weight_dtype=torch.float32)
    with pytest.raises(TypeError, match="head_fp32=True"):
        erpo.linear_logprobs_and_entropy(hidden, weight, targets, bias, backend=backend)
    want_logp, _, want_grads = head_reference(hidden, weight, bias, targets, 30.0, 1.0, 1.0, g_logp, g_ent)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    logp, entropy = erpo.linear_logprobs_and_entropy(leaves[0], leaves[1], targets, leaves[2], backend=backend,
                                                     softcap=30.0, head_fp32=True)
    assert rel_err(logp, want_logp) < VALUE_RTOL
    ((logp * g_logp).sum() + (entropy * g_ent).sum()).backward()
    assert [t.grad.dtype for t in leaves] == [torch.bfloat16, torch.float32, torch.float32]
    assert grad_err(leaves[1].grad, want_grads[1]) < GRAD_RTOL


class _Float32Sizes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                self.largest = max(self.largest, t.numel())
        return out


def test_fp32_head_never_copies_the_weight_to_fp32(monkeypatch):
    """The torch head upcasts VOCAB_SLICE weight rows at a time: no float32 tensor of V x H elements exists in the
    forward (the backward's only one is grad_weight itself, the float32 accumulator every head has)."""
    monkeypatch.setattr(torch_head, "VOCAB_SLICE", 64)
    hidden, weight, bias, targets, *_ = head_case(8, 40, 1000, torch.bfloat16, None, 1.0)
    probe = _Float32Sizes()
    with probe:
        torch_head.forward(row_layout(hidden), weight, bias, targets, 1.0, IGNORE, head_fp32=True)
    assert probe.largest < weight.numel() // 4


# ---- bad input, one line each ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,error,match", [
    ({"softcap": 0.0}, ValueError, "softcap must be > 0"),
    ({"softcap": -3.0}, ValueError, "softcap must be > 0"),
    ({"softcap": math.inf}, ValueError, "softcap must be finite"),
    ({"softcap": math.nan}, ValueError, "softcap must be finite"),
    ({"logit_scale": math.inf}, ValueError, "logit_scale must be finite"),
    ({"logit_scale": math.nan}, ValueError, "logit_scale must be finite"),
    ({"logit_scale": None}, TypeError, "logit_scale must be a Python number"),
    ({"logit_scale": -0.5}, ValueError, "logit_scale must be >= 0"),
    ({"softcap": True}, TypeError, "softcap must be a Python number or None"),
    ({"softcap": torch.tensor(3.0)}, TypeError, "softcap must be a Python number or None"),
])
def test_bad_transform_is_one_line(kwargs, error, match):
    logits = torch.randn(2, 5)
    hidden, weight = torch.randn(2, 3), torch.randn(5, 3)
    targets = torch.tensor([1, 2])
    for call in (lambda: erpo.logprobs_and_entropy(logits, targets, **kwargs),
                 lambda: erpo.linear_logprobs_and_entropy(hidden, weight, targets, **kwargs)):
        with pytest.raises(error, match=match) as info:
            call()
        assert "\n" not in str(info.value)


def test_what_cannot_take_a_transform_yet_says_so():
    logits, targets = torch.randn(2, 5), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="backend='cuda' does not implement softcap/logit_scale"):
        erpo.logprobs_and_entropy(logits, targets, backend="cuda", softcap=3.0)
    with pytest.raises(ValueError, match="truncated support"):
        erpo.logprobs_and_entropy(logits, targets, support=erpo.Support(top_k=2), softcap=3.0)
    with pytest.raises(ValueError, match="truncated support"):
        erpo.linear_logprobs_and_entropy(torch.randn(2, 3), torch.randn(5, 3), targets, head_fp32=True,
                                         support=erpo.Support(top_k=2))
    with pytest.raises(TypeError, match="head_fp32 must be True or False"):
        erpo.linear_logprobs_and_entropy(torch.randn(2, 3), torch.randn(5, 3), targets, head_fp32=1)


# ---- the losses on top -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("method,schedules", [("dapo", ("one_pass", "two_pass")), ("kl_cov", ("two_pass",))])
def test_losses_take_the_models_head(method, schedules):
    """policy_loss(softcap=, logit_scale=) on raw logits and linear_policy_loss (both schedules) give the loss and
    gradients of policy_loss on the logits the model would output, c tanh(s y / c)."""
    from erpo.losses.config import LossConfig

    B, L, H, V = 3, 5, 16, 97
    hidden, weight, bias = torch.randn(B, L, H), torch.randn(V, H) * 2, torch.randn(V)
    batch = dict(targets=torch.randint(0, V, (B, L)), mask=torch.ones(B, L), old_logp=-torch.rand(B, L) * 3,
                 advantages=torch.randn(B))
    config = LossConfig(method=method, temperature=0.9)

    def run(fn):
        leaves = [t.clone().double().requires_grad_() if fn == "model" else t.clone().requires_grad_()
                  for t in (hidden, weight, bias)]
        if fn == "model":
            y = leaves[0] @ leaves[1].T + leaves[2]
            result = erpo.policy_loss(5.0 * torch.tanh(0.7 * y / 5.0), batch, config)
        elif fn == "raw":
            result = erpo.policy_loss(leaves[0] @ leaves[1].T + leaves[2], batch, config, softcap=5.0, logit_scale=0.7)
        else:
            result = erpo.linear_policy_loss(leaves[0], leaves[1], batch, config, bias=leaves[2], schedule=fn,
                                             softcap=5.0, logit_scale=0.7)
        result.loss.backward()
        return result.loss.detach().double(), [t.grad for t in leaves]

    want_loss, want_grads = run("model")
    for fn in ("raw", *schedules):
        loss, grads = run(fn)
        assert abs(loss.item() - want_loss.item()) < VALUE_RTOL * max(abs(want_loss.item()), 1.0)
        for got, want in zip(grads, want_grads):
            assert grad_err(got, want) < GRAD_RTOL
