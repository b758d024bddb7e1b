"""An id outside [0, V) that is not ignore_index (check_targets=False; on a vocabulary shard, a target another
rank holds): every backend gives NaN logp, the row's true entropy, and the gradient without the one-hot term.
The vocabulary-parallel ops rely on it (erpo/ops/vocab_parallel.py)."""
import pytest
import torch

import erpo
from erpo.ops import torch_linear_logprobs_entropy as torch_head


def _reference(logits, g_logp, g_ent, temperature):
    """float64: entropy, and the gradient of sum(g_logp * logp(valid rows) + g_ent * entropy) with no one-hot
    term on the out-of-range rows (their logp is not a function of the logits)."""
    z = logits.double() / temperature
    logq = torch.log_softmax(z, -1)
    p = logq.exp()
    entropy = -(p * logq).sum(-1)
    mean = (p * z).sum(-1, keepdim=True)
    grad = (-g_logp[:, None] * p - g_ent[:, None] * p * (z - mean)) / temperature
    return entropy, grad


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_logits_op(backend):
    n, v, temperature = 7, 29, 0.8
    logits = (torch.randn(n, v) * 2).requires_grad_()
    targets = torch.tensor([v, -1, v + 5, -7, v, 2 * v, -2])  # all outside [0, V), none is ignore_index
    logp, entropy = erpo.logprobs_and_entropy(logits, targets, temperature=temperature, backend=backend,
                                              check_targets=False)
    assert torch.isnan(logp).all()
    g_ent = torch.randn(n)
    g_logp = torch.randn(n)
    # logp is NaN: its gradient is pushed through a where so the backward still receives a finite g_logp.
    (torch.where(torch.isnan(logp), 0.0, logp) * 0 + entropy * g_ent).sum().backward(retain_graph=True)
    want_entropy, want_grad = _reference(logits.detach(), torch.zeros(n), g_ent, temperature)
    assert (entropy.double() - want_entropy).abs().max() < 1e-5 * want_entropy.abs().max()
    assert (logits.grad.double() - want_grad).abs().max() < 1e-5 * want_grad.abs().max()
    logits.grad = None
    torch.autograd.backward([logp, entropy], [g_logp, g_ent])
    _, want_grad = _reference(logits.detach(), g_logp, g_ent, temperature)
    assert (logits.grad.double() - want_grad).abs().max() < 1e-5 * want_grad.abs().max()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_head(backend, monkeypatch):
    monkeypatch.setattr(torch_head, "ROWS", 3)  # chunks cross the rows
    n, h, v = 7, 6, 23
    hidden = torch.randn(n, h, requires_grad=True)
    weight = (torch.randn(v, h) * 0.7).requires_grad_()
    targets = torch.tensor([v, -1, 3, v + 9, -100, 0, -5])  # rows 2 and 5 in range, row 4 ignored
    logp, entropy = erpo.linear_logprobs_and_entropy(hidden, weight, targets, backend=backend, check_targets=False)
    outside = torch.tensor([True, True, False, True, False, False, True])
    assert torch.isnan(logp[outside]).all() and torch.isfinite(logp[~outside]).all()
    g_logp, g_ent = torch.randn(n), torch.randn(n)
    torch.autograd.backward([logp, entropy], [g_logp, g_ent])
    # Reference: the logits path in float64 with the out-of-range rows' logp gradient through p only.
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    logq = torch.log_softmax(h64 @ w64.T, -1)
    p = logq.exp()
    ent = -(p * logq).sum(-1)
    safe = torch.where(outside | (targets == -100), 0, targets)
    picked = logq.gather(-1, safe[:, None])[:, 0]
    keep = ~outside & (targets != -100)
    # d logp / dz for an absent target is -p (the one-hot part is missing): the gradient of -logsumexp(z).
    absent = -torch.logsumexp(h64 @ w64.T, -1)
    loss = (torch.where(keep, picked, torch.where(outside, absent, 0.0)) * g_logp.double()).sum()
    loss = loss + (torch.where(targets == -100, 0.0, ent) * g_ent.double()).sum()
    loss.backward()
    for got, want in ((hidden.grad, h64.grad), (weight.grad, w64.grad)):
        assert (got.double() - want).abs().max() < 1e-5 * want.abs().max()
