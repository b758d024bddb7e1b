"""policy_loss(..., shift=True) on a causal LM's unsliced [B, L+1, V] logits: the same loss, metrics and
gradients as on logits[:, :-1], the dropped position's gradient exactly zero, with and without inplace_grad."""
import dataclasses

import pytest
import torch

import erpo
from tests.losses.conftest import random_batch


@pytest.mark.parametrize("method", ["grpo", "kl_cov"])
@pytest.mark.parametrize("inplace", [False, True])
def test_shift_equals_slicing(method, inplace):
    logits, batch = random_batch(B=4, L=6, V=23)
    full = torch.cat([logits, torch.randn(4, 1, 23) * 2], dim=1)  # one more position, never scored
    config = erpo.LossConfig(method=method)
    results, grads = [], []
    for shift in (False, True):
        leaf = full.clone().requires_grad_()
        source = leaf * 1  # in place needs a non-leaf
        cfg = dataclasses.replace(config, inplace_grad=inplace)
        result = erpo.policy_loss(source, batch, cfg, shift=True) if shift else erpo.policy_loss(
            source[:, :-1], batch, cfg)
        result.loss.backward()
        results.append(result)
        grads.append(leaf.grad)
    assert torch.allclose(results[1].loss, results[0].loss, rtol=1e-6, atol=1e-7)
    for name, value in results[0].metrics.items():
        assert torch.allclose(results[1].metrics[name].double(), value.double(), rtol=1e-6, atol=1e-7), name
    assert torch.equal(grads[1][:, -1], torch.zeros_like(grads[1][:, -1]))
    assert torch.allclose(grads[1], grads[0], rtol=1e-6, atol=1e-8)


def test_shift_needs_a_position_dim():
    _, batch = random_batch(B=2, L=3, V=5)
    with pytest.raises(ValueError, match="shift=True"):
        erpo.policy_loss(torch.randn(5), batch, erpo.LossConfig(method="grpo"), shift=True)
