"""A batch without a valid token (every completion masked: truncated at the length limit, a DP rank whose rows are
all padding) is an ordinary event: every entry gives a differentiable 0 (loss 0 with a grad_fn, zero gradients),
never raises, never NaN, and counts it in `n_empty_batches`; a gradient-accumulation step whose micro-batches are
partly empty still equals the big batch; a stateful controller does not step on an empty measurement."""
import pytest
import torch

import erpo
from erpo.losses.config import AGGREGATIONS, METHODS
from tests.losses.conftest import random_batch

B, L, H, V = 4, 5, 6, 11


def empty_batch(dtype=torch.float64):
    logits, batch = random_batch(B=B, L=L, V=V, dtype=dtype, rewards=False)
    batch["mask"] = torch.zeros_like(batch["mask"])
    return logits, batch


def config_for(method, **knobs):
    return erpo.LossConfig(method=method, backend="torch", max_len=L, **knobs)


def assert_differentiable_zero(result, grads):
    assert result.loss.grad_fn is not None, "the loss of an empty batch must stay in the graph (a differentiable 0)"
    assert result.loss.item() == 0.0
    for grad in grads:
        assert grad is not None and torch.isfinite(grad).all() and not grad.any(), "an empty batch moves nothing"
    assert result.metrics["n_empty_batches"].item() == 1 and result.metrics["n_valid_tokens"].item() == 0
    for name, value in result.metrics.items():
        if name not in ("ratio_min", "ratio_max"):  # +inf / -inf: the identity of min / max over no token
            assert torch.isfinite(value).all(), f"metric {name} is {value} on an empty batch"


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("check_inputs", [True, False])
def test_policy_loss_of_an_empty_batch_is_a_differentiable_zero(method, check_inputs):
    logits, batch = empty_batch()
    leaf = logits.clone().requires_grad_()
    result = erpo.policy_loss(leaf, batch, config_for(method, check_inputs=check_inputs, entropy_coef=0.01))
    result.loss.backward()
    assert_differentiable_zero(result, [leaf.grad])


@pytest.mark.parametrize("agg", AGGREGATIONS)
@pytest.mark.parametrize("normalizers", [False, True])
def test_every_aggregation_gives_zero_with_and_without_global_counts(agg, normalizers):
    logits, batch = empty_batch()
    if normalizers:
        batch.update(num_items_in_batch=17.0, num_seqs_in_batch=6.0)
    leaf = logits.clone().requires_grad_()
    result = erpo.policy_loss(leaf, batch, config_for("dapo", agg=agg, kl_coef=0.1, entropy_coef=0.02))
    result.loss.backward()
    assert_differentiable_zero(result, [leaf.grad])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_token_policy_loss_of_an_empty_batch(backend):
    _, batch = empty_batch()
    del batch["targets"]
    logp = torch.log(torch.rand(B, L) * 0.9 + 0.05).requires_grad_()
    entropy = (torch.rand(B, L) * 2).requires_grad_()
    config = erpo.LossConfig(method="luspo", backend=backend, entropy_coef=0.01, kl_coef=0.05)
    result = erpo.token_policy_loss(logp, entropy, batch, config)
    result.loss.backward()
    assert_differentiable_zero(result, [logp.grad, entropy.grad])


@pytest.mark.parametrize("schedule,method", [("one_pass", "grpo"), ("one_pass", "dapo"), ("two_pass", "erpo"),
                                             ("two_pass", "high_entropy_mask")])
def test_linear_policy_loss_of_an_empty_batch(schedule, method):
    _, batch = empty_batch(torch.float32)
    hidden = torch.randn(B, L, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    bias = torch.randn(V, requires_grad=True)
    config = erpo.LossConfig(method=method, entropy_coef=0.01)
    result = erpo.linear_policy_loss(hidden, weight, batch, config, bias=bias, schedule=schedule)
    result.loss.backward()
    assert_differentiable_zero(result, [hidden.grad, weight.grad, bias.grad])


@pytest.mark.parametrize("method,knobs,knob", [
    ("dapo", dict(entropy_coef=0.01, entropy_target=5.0), "entropy_coef"),
    ("repo_r", dict(target_entropy=5.0), "zeta"),
    ("adapo", dict(target_entropy=5.0), "eps_high"),
])
def test_an_empty_batch_does_not_step_the_controller(method, knobs, knob):
    """The module's controller reads the batch's mean entropy; an empty batch has none: the state stays as it was
    (no step on a 0 or NaN entropy), and the next real batch steps it as usual."""
    module = erpo.PolicyLoss(erpo.LossConfig(method=method, backend="torch", **knobs))
    logits, batch = empty_batch()
    before = module.controller.state_dict()
    result = module(logits.clone().requires_grad_(), batch)
    module.step_controller(result)
    assert module.controller.state_dict() == before
    full_logits, full = random_batch(B=B, L=L, V=V, dtype=torch.float64, rewards=False)
    module.step_controller(module(full_logits, full))
    assert module.controller.state_dict() != before and getattr(module.current_config(), knob) is not None


def test_a_partly_empty_batch_is_unchanged():
    """Rows without a valid token next to real ones: same loss and gradient as without them (the counts of the
    aggregations are those of the valid rows)."""
    logits, batch = random_batch(B=B, L=L, V=V, dtype=torch.float64, rewards=False)
    config = config_for("grpo", entropy_coef=0.03)
    padded = {k: torch.cat([v, v[:2]]) for k, v in batch.items()}
    padded["mask"][B:] = False
    padded_logits = torch.cat([logits, logits[:2]]).requires_grad_()
    leaf = logits.clone().requires_grad_()
    want = erpo.policy_loss(leaf, batch, config)
    got = erpo.policy_loss(padded_logits, padded, config)
    want.loss.backward()
    got.loss.backward()
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(padded_logits.grad[:B], leaf.grad, rtol=1e-12, atol=0)
    assert not padded_logits.grad[B:].any()


@pytest.mark.parametrize("knobs", [
    dict(method="dapo", entropy_coef=0.02), dict(method="grpo", entropy_coef=0.02), dict(method="dr_grpo"),
    dict(method="luspo", eps_low=0.2, eps_high=0.28, entropy_coef=0.01), dict(method="cispo"),
    dict(method="gspo", eps_low=0.2, eps_high=0.28), dict(method="vespo", kl_coef=0.05),
], ids=lambda k: "-".join(str(v) for v in k.values()))
def test_accumulation_with_empty_micro_batches_equals_the_big_batch(knobs):
    """Gradient accumulation where some micro-batches have no valid token: with the step's counts, the micro-batch
    losses and gradients still add up to the big batch's (float64, relative error). Batch-wide selections (80/20,
    Clip-Cov, KL-Cov, ERPO's groups) are per micro-batch by design, so the row-local presets are compared."""
    logits, batch = random_batch(B=8, L=L, V=V, dtype=torch.float64, rewards=False, empty_rows=(0, 1, 5))
    config = erpo.LossConfig(backend="torch", max_len=L, **knobs)
    mask = batch["mask"]
    counts = {"num_items_in_batch": mask.sum().item(), "num_seqs_in_batch": float(mask.shape[0])}
    if config.agg == "seq-mean-token-mean":
        counts["num_seqs_in_batch"] = float((mask.sum(1) > 0).sum())
    leaf = logits.clone().requires_grad_()
    whole = erpo.policy_loss(leaf, batch, config)
    whole.loss.backward()
    total, grads, empties = 0.0, [], 0
    for rows in (slice(0, 2), slice(2, 5), slice(5, 6), slice(6, 8)):  # micro-batches 0 and 2 are empty
        part = {k: v[rows] for k, v in batch.items()}
        part_leaf = logits[rows].clone().requires_grad_()
        result = erpo.policy_loss(part_leaf, {**part, **counts}, config)
        result.loss.backward()
        total, grads = total + result.loss, grads + [part_leaf.grad]
        empties += int(result.metrics["n_empty_batches"])
    assert empties == 2
    error = (total - whole.loss).abs().item() / max(whole.loss.abs().item(), 1e-12)
    assert error < 1e-10, f"loss: relative error {error:.2e}"
    grad = torch.cat(grads)
    error = (grad - leaf.grad).norm().item() / leaf.grad.norm().item()
    assert error < 1e-10 and leaf.grad.norm() > 0, f"gradient: relative error {error:.2e}"
