"""What `entropy_coef` means, under every preset and every aggregation: the loss gets -entropy_coef x the mean entropy
per valid token (of the optimizer step when num_items_in_batch is given), whatever the policy term's aggregation
(TRL 1.16's rule: "the bonus is always the mean per-token entropy regardless of loss_type"). Before, the bonus was
aggregated like the policy term, so LUSPO's length weighting multiplied the coefficient by the mean response length
(13.3x on TRL's test_entropy_bonus_scale) and Dr. GRPO's divided it by L_max / mean length. float64, relative error."""
import pytest
import torch

import erpo
from erpo.losses.config import AGGREGATIONS, METHODS

B, L = 5, 9
COEF = 0.03


def inputs(lengths):
    logp = torch.log(torch.rand(B, L, dtype=torch.float64) * 0.9 + 0.05)
    old = -(logp + 0.3 * torch.randn(B, L, dtype=torch.float64)).abs()
    ref = -(logp + 0.3 * torch.randn(B, L, dtype=torch.float64)).abs()
    mask = torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]
    entropy = torch.rand(B, L, dtype=torch.float64) * 3
    batch = {"mask": mask, "old_logp": old, "ref_logp": ref, "advantages": torch.randn(B, dtype=torch.float64),
             "group_ids": torch.tensor([0, 0, 1, 1, 1])}
    return logp, entropy, batch


def run(logp, entropy, batch, config):
    logp, entropy = logp.clone().requires_grad_(), entropy.clone().requires_grad_()
    result = erpo.token_policy_loss(logp, entropy, batch, config)
    result.loss.backward()
    return result, logp.grad, entropy.grad


def rel(actual, expected):
    return (actual - expected).abs().max().item() / max(expected.abs().max().item(), 1e-300)


def knobs_for(method):
    # Clip-Cov's zeroed tokens lose their whole term, the bonus included: no candidate here, so it picks none.
    return dict(clip_cov_lb=100.0, clip_cov_ub=200.0) if method == "clip_cov" else {}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("agg", [None, *AGGREGATIONS])
def test_entropy_coef_is_the_weight_of_the_mean_token_entropy(method, agg):
    """loss(coef) - loss(0) == -coef x mean entropy over the valid tokens, and d loss / d H == -coef / N_valid on
    each valid token, for every preset (its own aggregation, agg=None) and every aggregation."""
    logp, entropy, batch = inputs([9, 2, 6, 1, 4])  # ragged: length-weighted aggregations differ from a token mean
    fields = dict(method=method, backend="torch", max_len=12, **knobs_for(method))
    if agg is not None:
        fields["agg"] = agg
    with_bonus, _, grad_entropy = run(logp, entropy, batch, erpo.LossConfig(entropy_coef=COEF, **fields))
    without, _, _ = run(logp, entropy, batch, erpo.LossConfig(entropy_coef=0.0, **fields))
    valid = batch["mask"]
    mean_entropy = entropy[valid].mean()
    bonus = without.loss - with_bonus.loss
    assert rel(bonus, COEF * mean_entropy) < 1e-12, f"bonus {bonus.item()} = {(bonus / (COEF * mean_entropy)).item()}" \
                                                   f" x coef x mean entropy"
    expected_grad = valid.to(torch.float64) * (-COEF / float(valid.sum()))
    assert rel(grad_entropy, expected_grad) < 1e-12
    assert rel(with_bonus.metrics["entropy_bonus"], mean_entropy) < 1e-12


@pytest.mark.parametrize("method", ["dapo", "grpo", "dr_grpo", "luspo"])
def test_with_the_steps_token_count_the_bonus_is_the_steps_token_mean(method):
    """With num_items_in_batch (the step's valid tokens) the bonus divides by it, so the bonuses of micro-batches add
    up to the step's mean entropy, as the policy term adds up to the step's loss."""
    logp, entropy, batch = inputs([9, 2, 6, 1, 4])
    batch.update(num_items_in_batch=40.0, num_seqs_in_batch=11.0)
    fields = dict(method=method, backend="torch", max_len=12)
    with_bonus, _, _ = run(logp, entropy, batch, erpo.LossConfig(entropy_coef=COEF, **fields))
    without, _, _ = run(logp, entropy, batch, erpo.LossConfig(entropy_coef=0.0, **fields))
    assert rel(without.loss - with_bonus.loss, COEF * entropy[batch["mask"]].sum() / 40.0) < 1e-12


def test_the_one_pass_fused_head_takes_the_same_bonus():
    """linear_policy_loss's one-pass schedule computes the gradient inside the forward: its entropy coefficient must
    follow the same token-mean rule (equal to the two-pass schedule, which goes through loss_from_token_stats)."""
    torch.manual_seed(0)
    hidden = torch.randn(B, L, 6, dtype=torch.float32)
    weight = torch.randn(11, 6) * 0.5
    _, _, batch = inputs([9, 2, 6, 1, 4])
    batch = {k: v.float() if v.dtype == torch.float64 else v for k, v in batch.items()}
    batch["targets"] = torch.randint(0, 11, (B, L))
    config = erpo.LossConfig(method="dr_grpo", entropy_coef=0.2, max_len=12)
    grads = []
    for schedule in ("one_pass", "two_pass"):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        result = erpo.linear_policy_loss(h, w, batch, config, schedule=schedule)
        result.loss.backward()
        grads.append((result.loss.detach(), h.grad, w.grad))
    for one, two in zip(*grads):
        assert rel(one.double(), two.double()) < 1e-4
