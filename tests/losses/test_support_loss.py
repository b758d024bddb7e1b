"""The policy losses over the sampler's truncated support: policy_loss and linear_policy_loss (and PolicyLoss) score
the ratio and the KL over S, the entropy terms over the distribution support_entropy names; equal to the loss of the
same config on per-token statistics computed over S (token_policy_loss), and the full support is today's loss."""
import pytest
import torch

import erpo
from erpo.ops.support_logprobs_entropy import support_logprobs_and_entropy

B, L, V, H = 3, 5, 97, 16


def make(seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, L, H, generator=gen)
    weight = torch.randn(V, H, generator=gen) * 0.6
    logits = hidden @ weight.T
    targets = torch.distributions.Categorical(logits=logits).sample()  # sampled, mostly inside S
    with torch.no_grad():
        old = erpo.logprobs_and_entropy(logits, targets)[0] + 0.05 * torch.randn(B, L, generator=gen)
    mask = torch.ones(B, L)
    mask[1, 3:] = 0
    batch = {"targets": targets, "mask": mask, "old_logp": old, "ref_logp": old - 0.1,
             "advantages": torch.randn(B, generator=gen)}
    return hidden, weight, logits, batch


@pytest.mark.parametrize("method,entropy_from", [("dapo", "full"), ("grpo", "full"), ("dapo", "support"),
                                                  ("kl_cov", "full")])
def test_the_loss_over_s_is_the_token_loss_of_the_statistics_over_s(method, entropy_from):
    hidden, weight, logits, batch = make()
    config = erpo.LossConfig(method=method, support=erpo.Support(top_p=0.85, top_k=30), entropy_coef=0.01,
                             support_entropy=entropy_from, temperature=0.9)
    x = logits.clone().requires_grad_()
    result = erpo.policy_loss(x, batch, config)
    result.loss.backward()
    y = logits.clone().requires_grad_()
    stats = support_logprobs_and_entropy(y, batch["targets"], 1 / 0.9, -100, config.support, None, True)
    entropy = stats.full_entropy if entropy_from == "full" else stats.entropy
    expected = erpo.token_policy_loss(stats.logp, entropy, batch, config.replace(support=None))
    expected.loss.backward()
    assert torch.allclose(result.loss, expected.loss, rtol=1e-5) and torch.allclose(x.grad, y.grad, atol=1e-6)
    assert 1 <= float(result.metrics["support_size_mean"]) < 30
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    fused = erpo.linear_policy_loss(h, w, batch, config)
    assert torch.allclose(fused.loss, result.loss, rtol=1e-5)


def test_replay_ids_in_the_batch_equal_recompute_and_the_full_support_is_todays_loss():
    _, _, logits, batch = make(1)
    support = erpo.Support(top_k=8)
    recompute = erpo.policy_loss(logits, batch, erpo.LossConfig(method="dapo", support=support))
    z = logits.reshape(-1, V)
    keep = (z >= z.topk(8, -1).values[:, -1:]) | torch.nn.functional.one_hot(batch["targets"].reshape(-1), V).bool()
    indptr = torch.cat([torch.zeros(1, dtype=torch.long), keep.sum(-1).cumsum(0)])
    ids = erpo.support_ids_from_csr(indptr, keep.nonzero()[:, 1]).view(B, L, -1)  # what the engine kept, its sample in
    replay = erpo.policy_loss(logits, {**batch, "support_ids": ids}, erpo.LossConfig(method="dapo"))
    assert torch.allclose(replay.loss, recompute.loss, rtol=1e-6)
    full = erpo.policy_loss(logits, batch, erpo.LossConfig(method="dapo", support=erpo.Support(top_p=1.0)))
    assert torch.equal(full.loss, erpo.policy_loss(logits, batch, erpo.LossConfig(method="dapo")).loss)
    assert "support_size_mean" not in full.metrics


def test_the_on_policy_ratio_over_s_is_one_where_the_full_one_is_not():
    """The point of it all: samples drawn from the truncated distribution, old log-probs scored as the engine
    scores them (over S); the trainer's ratio over S is exactly 1 on-policy, over the full vocabulary it is not."""
    _, _, logits, batch = make(2)
    support = erpo.Support(top_p=0.7)
    stats = support_logprobs_and_entropy(logits, batch["targets"], 1.0, -100, support, None, False)
    batch = {**batch, "old_logp": stats.logp.detach()}
    over_s = erpo.policy_loss(logits, batch, erpo.LossConfig(method="dapo", support=support))
    over_v = erpo.policy_loss(logits, batch, erpo.LossConfig(method="dapo"))
    assert abs(float(over_s.metrics["ratio_mean"]) - 1) < 1e-6
    assert float(over_v.metrics["ratio_mean"]) < 0.95


def test_bad_support_configs_are_one_line():
    _, _, logits, batch = make()
    with pytest.raises(ValueError, match="support_entropy must be one of"):
        erpo.LossConfig(support_entropy="both")
    with pytest.raises(TypeError, match="LossConfig.support must be an erpo.Support"):
        erpo.LossConfig(support={"top_p": 0.5})
    with pytest.raises(ValueError, match="not both"):
        erpo.policy_loss(logits, {**batch, "support_ids": batch["targets"].unsqueeze(-1)},
                         erpo.LossConfig(support=erpo.Support(top_k=2)))
