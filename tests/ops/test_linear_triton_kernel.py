"""The fused LM head's Triton kernels (erpo.kernels.linear_logprobs_entropy) against a float64 reference.

They run under TRITON_INTERPRET=1 here (tiny shapes: the interpreter costs programs x loop iterations) and
natively where a GPU is present. The module's own forward/backward are called directly, with the RowLayout
the op would pass; the autograd op and the torch backend are tested in tests/ops/test_linear_logprobs_entropy.py.

Tolerances, relative to the largest reference magnitude (floored at 1 for values):
- fp32 inputs: values 1e-5, gradients 1e-4 (fp32 accumulation over H and V; tl.dot in "ieee" precision).
- bf16/fp16 inputs: the reference takes the same rounded inputs, so values carry only fp32 accumulation
  error (1e-5); the gradient dots take dlogits rounded to the input dtype, one rounding: fp16 1e-3, bf16 4e-3
  on a GPU, 2^-7 under the interpreter (which truncates fp32 -> bf16 instead of rounding to nearest).
"""
import math
import os

import pytest
import torch

from erpo.kernels import linear_logprobs_entropy as kernel
from erpo.ops.row_layout import row_layout
from tests.conftest import DEVICE

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
IGNORE = -100
VALUE_RTOL = 1e-5
GRAD_RTOL = {torch.float32: 1e-4, torch.float16: 1e-3, torch.bfloat16: 2.0**-7 if INTERPRETED else 4e-3}
SMALL_TILES = (16, 32, 16, 4, 1)  # every V > 32 and H > 16 in the tests crosses tile edges


@pytest.fixture(autouse=True)
def _tiles(monkeypatch):
    monkeypatch.setattr(kernel, "TILES", SMALL_TILES)
    monkeypatch.setattr(kernel, "SPLIT_V", None)


def reference(hidden, weight, bias, targets, temperature):
    """float64 (logp, entropy, lse) from the full logits, with autograd (ignored rows give 0), and the raw
    logits, whose .grad after a backward is dlogits."""
    raw = hidden @ weight.T
    if bias is not None:
        raw = raw + bias
    raw.retain_grad()
    z = raw / temperature
    logprobs = torch.log_softmax(z, dim=-1)
    ignored = targets == IGNORE
    logp = logprobs.gather(1, torch.where(ignored, 0, targets).unsqueeze(1)).squeeze(1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    zero = torch.zeros_like(logp)
    return (torch.where(ignored, zero, logp), torch.where(ignored, zero, entropy),
            torch.where(ignored, zero, torch.logsumexp(z, dim=-1)), raw)


def rel_err(actual, expected, floor=0.0):
    scale = max(expected.abs().max().item(), floor)
    return (actual.double() - expected).abs().max().item() / max(scale, 1e-30)


def make_head(n, h, v, dtype=torch.float32, hidden_scale=1.0, with_bias=True):
    hidden = (torch.randn(n, h, device=DEVICE) * hidden_scale).to(dtype)
    weight = (torch.randn(v, h, device=DEVICE) / math.sqrt(max(h, 1)) * 3).to(dtype)
    bias = torch.randn(v, device=DEVICE).to(dtype) if with_bias else None
    targets = torch.randint(0, v, (n,), device=DEVICE)
    return hidden, weight, bias, targets


def run_kernels(hidden, weight, bias, targets, temperature, grad_logp, grad_entropy, layout=None):
    layout = layout if layout is not None else row_layout(hidden)
    logp, entropy, lse = kernel.forward(layout, weight, bias, targets, 1.0 / temperature, IGNORE)
    grads = kernel.backward(layout, weight, bias, targets, lse, entropy, grad_logp, grad_entropy,
                            1.0 / temperature, IGNORE)
    return (logp, entropy, lse), grads


def check_against_reference(hidden, weight, bias, targets, temperature=1.0, terms=(True, True)):
    n = targets.numel()
    grad_logp = torch.randn(n, device=DEVICE) if terms[0] else None
    grad_entropy = torch.randn(n, device=DEVICE) if terms[1] else None
    (logp, entropy, lse), (g_hidden, g_weight, g_bias) = run_kernels(hidden, weight, bias, targets, temperature,
                                                                     grad_logp, grad_entropy)
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    ref_logp, ref_entropy, ref_lse, ref_raw = reference(*leaves, targets, temperature)
    for name, got, want in (("logp", logp, ref_logp), ("entropy", entropy, ref_entropy), ("lse", lse, ref_lse)):
        assert got.dtype == torch.float32 and got.shape == (n,)
        assert rel_err(got, want, 1.0) < VALUE_RTOL, name
    loss = sum((g.double() * out).sum() for g, out in ((grad_logp, ref_logp), (grad_entropy, ref_entropy))
               if g is not None)
    loss.backward()
    # Each gradient is a sum over V (grad_hidden) or N (grad_weight, grad_bias) of terms that largely cancel
    # (dlogits sums to ~0 per row), so its error is measured against the sum of the terms' magnitudes,
    # |dlogits| @ |W| etc., the scale fp32 accumulation error lives on; never below the largest |gradient|.
    dlogits = ref_raw.grad.abs()
    scales = ((dlogits @ leaves[1].abs()).max().item(), (dlogits.T @ leaves[0].abs()).max().item(),
              dlogits.sum(0).max().item())
    tolerance = GRAD_RTOL[hidden.dtype]
    assert g_hidden.dtype == g_weight.dtype == torch.float32 and g_hidden.is_contiguous()
    assert rel_err(g_hidden, leaves[0].grad, scales[0]) < tolerance, "grad_hidden"
    assert rel_err(g_weight, leaves[1].grad, scales[1]) < tolerance, "grad_weight"
    if bias is None:
        assert g_bias is None
    else:
        assert rel_err(g_bias, leaves[2].grad, scales[2]) < tolerance, "grad_bias"
    return (logp, entropy, lse), (g_hidden, g_weight, g_bias)


@pytest.mark.parametrize("n,h,v", [(1, 1, 37), (1, 5, 1), (13, 20, 33), (37, 45, 101), (32, 32, 64)])
def test_fp32_matches_float64_on_odd_shapes(n, h, v):
    check_against_reference(*make_head(n, h, v))


@pytest.mark.parametrize("terms", [(True, False), (False, True)])
def test_one_gradient_term_absent(terms):
    check_against_reference(*make_head(19, 24, 70, with_bias=False), temperature=0.6, terms=terms)


def test_temperature_and_some_rows_ignored():
    hidden, weight, bias, targets = make_head(35, 21, 90)
    targets[[0, 7, 16, 17, 34]] = IGNORE
    (logp, entropy, lse), (g_hidden, _, _) = check_against_reference(hidden, weight, bias, targets, 0.7)
    ignored = targets == IGNORE
    assert (logp[ignored] == 0).all() and (entropy[ignored] == 0).all() and (lse[ignored] == 0).all()
    assert (g_hidden[ignored] == 0).all()


def test_all_rows_ignored_are_never_read():
    hidden, weight, bias, targets = make_head(20, 18, 50)
    hidden.fill_(float("nan"))  # any read of an ignored row would show up as NaN
    targets.fill_(IGNORE)
    (logp, entropy, lse), grads = run_kernels(hidden, weight, bias, targets, 1.0, torch.randn(20, device=DEVICE),
                                              torch.randn(20, device=DEVICE))
    for tensor in (logp, entropy, lse, *grads):
        assert (tensor == 0).all()


def test_vocabulary_split_merges_row_states(monkeypatch):
    """The forward's split of V over several programs per row tile, and the merge of their states."""
    monkeypatch.setattr(kernel, "SPLIT_V", 3)
    hidden, weight, bias, targets = make_head(9, 17, 150)
    # The row max in the last split and the target in the first: a wrong merge cannot pass.
    bias[140] = 12.0
    targets[:4] = 3
    splits, _ = kernel.forward_plan(9, 150, torch.float32, torch.device(DEVICE))
    assert splits == 3
    check_against_reference(hidden, weight, bias, targets, 0.9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_production_tiles_once(monkeypatch, dtype):
    tiles = kernel.GPU_TILES[dtype]
    monkeypatch.setattr(kernel, "TILES", tiles)
    check_against_reference(*make_head(3, tiles[2] + 3, tiles[1] + 5, dtype), temperature=1.3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_large_magnitude_hidden(dtype):
    scale = 60.0 if dtype == torch.bfloat16 else 8.0  # |z| in the hundreds (bf16) / tens (fp16 range)
    hidden, weight, bias, targets = make_head(21, 40, 77, dtype, hidden_scale=scale)
    check_against_reference(hidden, weight, bias, targets, 1.1)


def test_strided_hidden_is_read_in_place():
    batch = torch.randn(3, 8, 20, device=DEVICE)
    hidden = batch[:, :-1]  # the shifted view: rows not evenly spaced
    layout = row_layout(hidden)
    assert layout.tensor.data_ptr() == batch.data_ptr() and layout.inner == 7
    _, weight, bias, _ = make_head(1, 20, 45)
    targets = torch.randint(0, 45, (21,), device=DEVICE)
    g_logp, g_ent = torch.randn(21, device=DEVICE), torch.randn(21, device=DEVICE)
    strided = run_kernels(hidden, weight, bias, targets, 0.8, g_logp, g_ent, layout)
    dense = run_kernels(hidden.reshape(21, 20).contiguous(), weight, bias, targets, 0.8, g_logp, g_ent)
    for got, want in zip((*strided[0], *strided[1]), (*dense[0], *dense[1])):
        assert torch.equal(got, want)
    check_against_reference(hidden.reshape(21, 20), weight, bias, targets, 0.8)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy under the interpreter: log(0) of the NaN row
def test_nan_row_stays_in_its_row():
    hidden, weight, bias, targets = make_head(18, 20, 40)
    hidden[5, 3] = float("nan")
    hidden[11] = float("nan")
    targets[11] = IGNORE  # an ignored NaN row is never read: nothing of it may leak
    g_logp, g_ent = torch.randn(18, device=DEVICE), torch.randn(18, device=DEVICE)
    (logp, entropy, lse), (g_hidden, g_weight, g_bias) = run_kernels(hidden, weight, bias, targets, 1.0, g_logp,
                                                                     g_ent)
    for out in (logp, entropy, lse):
        assert out[5].isnan() and out[11] == 0
    assert g_hidden[5].isnan().all() and (g_hidden[11] == 0).all()
    assert g_weight.isnan().any() and g_bias.isnan().any()  # the NaN row's dlogits reach every column
    keep = torch.tensor([i for i in range(18) if i not in (5, 11)], device=DEVICE)
    clean = run_kernels(hidden[keep], weight, bias, targets[keep], 1.0, g_logp[keep], g_ent[keep])
    for got, want in zip((logp, entropy, lse, g_hidden), (*clean[0], clean[1][0])):
        assert rel_err(got[keep], want.double(), 1.0) < VALUE_RTOL


def test_inf_logit_gives_nan_row_and_out_of_range_target_nan_logp():
    hidden, weight, bias, targets = make_head(6, 10, 40)
    bias[7] = float("inf")  # +inf logit in every row
    logp, entropy, lse = kernel.forward(row_layout(hidden), weight, bias, targets, 1.0, IGNORE)
    assert logp.isnan().all() and entropy.isnan().all() and lse.isnan().all()
    hidden, weight, bias, targets = make_head(6, 10, 40)
    targets[2] = 40  # outside [0, V): only reachable when the op's checks are bypassed
    logp, entropy, _ = kernel.forward(row_layout(hidden), weight, bias, targets, 1.0, IGNORE)
    assert logp[2].isnan() and entropy[2].isfinite() and logp[[0, 1, 3, 4, 5]].isfinite().all()


@pytest.mark.skipif(INTERPRETED, reason="the interpreter runs programs one after another: only a GPU can reorder")
def test_backward_is_deterministic():
    """grad_weight is summed over row tiles by one program per column tile: bit-identical reruns."""
    hidden, weight, bias, targets = make_head(40, 24, 64)
    g = torch.randn(40, device=DEVICE)
    first = run_kernels(hidden, weight, bias, targets, 1.0, g, g)[1]
    second = run_kernels(hidden, weight, bias, targets, 1.0, g, g)[1]
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_layout_slips_are_refused_before_any_kernel():
    hidden, weight, bias, targets = make_head(4, 8, 20)
    layout = row_layout(hidden)
    with pytest.raises(ValueError, match="weight"):
        kernel.forward(layout, weight.t().contiguous().t(), bias, targets, 1.0, IGNORE)
    with pytest.raises(ValueError, match="dtype"):
        kernel.forward(layout, weight.double(), None, targets, 1.0, IGNORE)
    with pytest.raises(ValueError, match="bias"):
        kernel.forward(layout, weight, bias[:-1], targets, 1.0, IGNORE)
    with pytest.raises(ValueError, match="targets"):
        kernel.forward(layout, weight, bias, targets.int(), 1.0, IGNORE)
