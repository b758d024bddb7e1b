"""What `LossConfig(check_inputs=...)` does, as docs/losses.md ("Errors and non-finite values") states it.

check_inputs=True: a batch with bad values raises, naming the problem (one host sync).
check_inputs=False: no host sync and no value check: the same batches are used as given, and several of them give
a FINITE loss, silently wrong (issue 25: the docs once promised a NaN loss for every bad value). If the loss is ever
made to poison bad values with NaN, this file and that passage change together.
"""
import pytest
import torch

import erpo
from tests.losses.sync_probe import HostSyncProbe


def _set(key, fn):
    def change(batch):
        batch[key] = fn(batch[key].clone())
    return change


def _first_valid(fill):
    def fn(tensor):
        tensor[0, 0] = fill  # conftest's random_batch makes position (0, 0) of every row valid
        return tensor
    return fn


# (name, method, change to a good batch, message with check_inputs=True)
SILENT = [  # check_inputs=False: a finite loss
    ("mask of 2s", "dapo", _set("mask", lambda m: m.long() * 2), "must hold only 0 and 1"),
    ("old_logp > 0", "dapo", _set("old_logp", lambda x: x.abs() + 0.3), r"old_logp'\] has a value > 0"),
    ("ignore id on a valid token", "dapo", _set("targets", _first_valid(-100)), "ignore id -100 where mask is 1"),
    ("ref_logp > 0", "grpo", _set("ref_logp", lambda x: x.abs() + 0.3), r"ref_logp'\] has a value > 0"),
]
POISONED = [  # check_inputs=False: a NaN loss
    ("old_logp NaN", "dapo", _set("old_logp", _first_valid(float("nan"))), "NaN or inf on a valid token"),
    ("rewards NaN", "dapo", _set("rewards", lambda r: r.index_fill(0, torch.tensor([0]), float("nan"))),
     r"rewards'\] has NaN"),
    ("target >= V, torch backend", "dapo", _set("targets", _first_valid(10_000)), r"outside \[0, 19\)"),
]


def _batch(make_batch, change):
    logits, batch = make_batch()  # V = 19, position (0, 0) of every row valid
    change(batch)
    return logits.float().requires_grad_(), batch


@pytest.mark.parametrize("name,method,change,message", SILENT + POISONED, ids=[c[0] for c in SILENT + POISONED])
def test_checks_on_raise(make_batch, name, method, change, message):
    logits, batch = _batch(make_batch, change)
    with pytest.raises(ValueError, match=message):
        erpo.policy_loss(logits, batch, erpo.LossConfig(method=method, check_inputs=True))


@pytest.mark.parametrize("name,method,change,message", SILENT, ids=[c[0] for c in SILENT])
def test_checks_off_can_be_silently_wrong(make_batch, name, method, change, message):
    """No sync, no check, no error: a finite loss from a batch the checks refuse."""
    logits, batch = _batch(make_batch, change)
    with HostSyncProbe():  # raises on any read back to the host
        result = erpo.policy_loss(logits, batch, erpo.LossConfig(method=method, check_inputs=False, backend="torch"))
        result.loss.backward()
    assert torch.isfinite(result.loss), name
    assert torch.isfinite(logits.grad).all(), name


@pytest.mark.parametrize("name,method,change,message", POISONED, ids=[c[0] for c in POISONED])
def test_checks_off_nan_values_give_a_nan_loss(make_batch, name, method, change, message):
    logits, batch = _batch(make_batch, change)
    with HostSyncProbe():
        result = erpo.policy_loss(logits, batch, erpo.LossConfig(method=method, check_inputs=False, backend="torch"))
    assert torch.isnan(result.loss), name


def test_checks_off_a_nonzero_mask_value_counts_as_one(make_batch):
    """A mask of 2s is not refused and weighs nothing extra: the loss equals the 0/1 mask's."""
    logits, batch = make_batch()
    logits = logits.float()
    config = erpo.LossConfig(method="dapo", check_inputs=False)
    twos = dict(batch, mask=batch["mask"].long() * 2)
    torch.testing.assert_close(erpo.policy_loss(logits, twos, config).loss, erpo.policy_loss(logits, batch, config).loss)


def test_checks_off_ignore_id_on_a_valid_token_still_counts(make_batch):
    """A valid token whose target is -100 gets the op's ignored-row values (log-prob 0, entropy 0) and still enters
    the loss: the token count includes it and the loss differs from the batch with that token masked out."""
    logits, batch = make_batch()
    logits = logits.float()
    config = erpo.LossConfig(method="dapo", check_inputs=False)
    bad = dict(batch, targets=batch["targets"].clone())
    bad["targets"][0, 0] = -100
    masked = dict(batch, mask=batch["mask"].clone())
    masked["mask"][0, 0] = False
    result = erpo.policy_loss(logits, bad, config)
    assert result.metrics["n_valid_tokens"] == batch["mask"].sum()
    assert not torch.allclose(result.loss, erpo.policy_loss(logits, masked, config).loss)
