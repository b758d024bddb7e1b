"""With check_inputs=False, one loss + backward reads nothing back to the host, for every method.

On a CPU machine a sync cannot be observed directly, so every Tensor method that would force one on a GPU
(item, tolist, bool/int/float conversion, nonzero, cpu, numpy) is made to raise while the loss runs.
"""
import pytest
import torch

import erpo
from erpo.losses.config import METHODS

SYNCING = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy")


@pytest.mark.parametrize("method", METHODS)
def test_no_host_sync_on_the_hot_path(method, make_batch, monkeypatch):
    logits, batch = make_batch(B=6, L=6, V=11, group_size=3, empty_rows=(2,))
    logits.requires_grad_()
    config = erpo.LossConfig(method=method, check_inputs=False, kl_coef=0.01, entropy_coef=0.01)

    def forbidden(name):
        def raise_(*args, **kwargs):
            raise AssertionError(f"host sync: Tensor.{name} called on the hot path")
        return raise_

    with monkeypatch.context() as patch:
        for name in SYNCING:
            patch.setattr(torch.Tensor, name, forbidden(name))
        result = erpo.policy_loss(logits, batch, config)
        result.loss.backward()
    assert torch.isfinite(result.loss) and logits.grad.abs().sum() > 0
    with pytest.raises(AssertionError, match="host sync"):  # the guard itself works
        with monkeypatch.context() as patch:
            patch.setattr(torch.Tensor, "item", forbidden("item"))
            torch.ones(1).item()


@pytest.mark.parametrize("method", ["dapo", "erpo", "clip_cov"])
def test_input_checks_cost_exactly_one_host_sync(method, make_batch, monkeypatch):
    logits, batch = make_batch(B=4, L=5, V=9, group_size=2)
    logits.requires_grad_()
    calls = []

    def counted(name, original):
        def wrapper(self, *args, **kwargs):
            calls.append(name)
            return original(self, *args, **kwargs)
        return wrapper

    with monkeypatch.context() as patch:
        for name in SYNCING:
            patch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
        erpo.policy_loss(logits, batch, erpo.LossConfig(method=method)).loss.backward()
    assert calls == ["tolist"]
