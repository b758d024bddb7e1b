"""linear_token_loss: any row-local per-token loss of (logp, entropy) from the hidden states on the one-pass
schedule equals the same loss through the logits (autograd), values and every gradient; bad inputs are one line."""
import pytest
import torch

import erpo

V, H = 211, 24


def make(seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 7, H, generator=gen)
    weight, bias = torch.randn(V, H, generator=gen) * 0.5, torch.randn(V, generator=gen)
    targets = torch.randint(0, V, (3, 7), generator=gen)
    targets[1, 4:] = -100
    inputs = {"adv": torch.randn(3, 7, generator=gen), "old": -torch.rand(3, 7, generator=gen) * 5}
    return hidden, weight, bias, targets, inputs


def grpo_like(logp, entropy, adv, old):
    ratio = torch.exp(logp - old)
    return -torch.minimum(ratio * adv, ratio.clamp(0.8, 1.2) * adv) - 0.01 * entropy


@pytest.mark.parametrize("fn", [grpo_like, lambda logp, entropy, adv, old: -logp * adv,
                                lambda logp, entropy, adv, old: (logp - old) ** 2 + entropy * 0])
def test_equals_the_loss_through_the_logits(fn, monkeypatch):
    from erpo.ops import torch_linear_logprobs_entropy as head

    monkeypatch.setattr(head, "ROWS", 5)  # chunks that split responses
    hidden, weight, bias, targets, inputs = make()
    h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    loss, logp, entropy = erpo.linear_token_loss(h, w, targets, fn, inputs, bias=b, temperature=0.9)
    loss.backward()
    h2, w2, b2 = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    lp, ent = erpo.logprobs_and_entropy(h2 @ w2.T + b2, targets, temperature=0.9)
    expected = torch.where(targets != -100, fn(lp, ent, **inputs), 0.0).sum()
    expected.backward()
    assert torch.allclose(loss, expected, rtol=1e-5, atol=1e-6)
    assert torch.allclose(logp, lp.detach(), atol=1e-6) and torch.allclose(entropy, ent.detach(), atol=1e-6)
    for ours, theirs in ((h.grad, h2.grad), (w.grad, w2.grad), (b.grad, b2.grad)):
        assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-6)


def test_bad_inputs_are_one_line():
    hidden, weight, bias, targets, inputs = make()
    with pytest.raises(ValueError, match="inputs\\['adv'\\] must be a tensor shaped like targets"):
        erpo.linear_token_loss(hidden, weight, targets, grpo_like, {**inputs, "adv": inputs["adv"][0]})
    with pytest.raises(ValueError, match="one loss per token"):
        erpo.linear_token_loss(hidden, weight, targets, lambda logp, entropy, **_: logp.sum(), inputs)
    with pytest.raises(TypeError, match="loss_fn must be a callable"):
        erpo.linear_token_loss(hidden, weight, targets, "grpo", inputs)
