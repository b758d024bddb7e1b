"""Each method with its knobs against the dense float64 reference (erpo/losses/naive.py: loops over groups,
responses and buckets, full log_softmax, each control's dense form), plus the spec's properties."""
import math
import types

import pytest
import torch

import erpo
from erpo.losses.controls import clip_cov, erpo as erpo_control, high_entropy_mask, kl_cov
from erpo.losses.shaping import Tokens
from erpo.losses.naive import naive_policy_loss

# Float64 logits on the torch backend: erpo and the reference then differ by rounding only
# (~1e-15 relative); 1e-9 leaves room for the sums over a few dozen tokens.
RTOL = 1e-9
methods = types.SimpleNamespace(erpo_advantage=erpo_control.erpo_advantage, clip_cov=clip_cov.clip_cov,
                                kl_cov=kl_cov.kl_cov, high_entropy_mask=high_entropy_mask.high_entropy_mask)


def expected_loss(config, logits, batch):
    return naive_policy_loss(logits, batch, config).loss.item()


def test_dapo_two_tokens_by_hand():
    # V = 2, logits (0, 0): logp = -ln 2. old = -ln 2 - ln 1.5 -> ratio 1.5 with A = +1 -> -1.28 (high clip);
    # old = -ln 2 + ln 2 -> ratio 0.5 with A = -2 -> -min(-1, -1.6) = 1.6. token-mean: (1.6 - 1.28) / 2 = 0.16.
    logits = torch.zeros(2, 1, 2, dtype=torch.float64)
    batch = {"targets": torch.zeros(2, 1, dtype=torch.long), "mask": torch.ones(2, 1, dtype=torch.bool),
             "old_logp": torch.tensor([[-math.log(2) - math.log(1.5)], [0.0]]),
             "advantages": torch.tensor([1.0, -2.0])}
    result = erpo.policy_loss(logits, batch, erpo.LossConfig(method="dapo"))
    assert result.loss.item() == pytest.approx(0.16, rel=1e-6)
    assert result.metrics["clip_frac_high"].item() == 0.5 and result.metrics["clip_frac_low"].item() == 0.5
    assert result.metrics["entropy"].item() == pytest.approx(math.log(2))


CASES = [
    ("grpo", {}),
    ("grpo", dict(adv_estimator="rloo", kl_estimator="k2", dual_clip=True)),
    ("dapo", dict(entropy_coef=0.01, kl_coef=0.1, kl_estimator="k1")),
    ("dr_grpo", {}),
    ("dr_grpo", dict(agg="seq-mean-token-sum")),
    ("erpo", {}),
    ("erpo", dict(gate="amplify", buckets=3)),
    ("erpo", dict(gate="none", eta=0.5, gamma=2.0)),
    ("erpo", dict(eta=0.0, temperature=0.7)),
    ("high_entropy_mask", {}),
    ("high_entropy_mask", dict(rho=0.5)),
    ("kl_cov", {}),
    ("kl_cov", dict(kl_cov_ratio=0.2, kl_cov_beta=0.5)),
    ("repo", {}),
    ("repo_r", dict(zeta=0.05)),
    ("adapo", dict(eps_high=0.6)),
]


@pytest.mark.parametrize("method, knobs", CASES)
def test_method_matches_the_dense_reference(method, knobs, make_batch):
    logits, batch = make_batch(B=6, L=5, V=7, group_size=3, dtype=torch.float64, empty_rows=(4,))
    config = erpo.LossConfig(method=method, backend="torch", **knobs)
    got = erpo.policy_loss(logits, batch, config).loss.item()
    assert got == pytest.approx(expected_loss(config, logits, batch), rel=RTOL, abs=1e-12)


def test_clip_cov_matches_the_dense_reference_with_its_keys(make_batch):
    logits, batch = make_batch(B=6, L=6, V=7, dtype=torch.float64, rewards=False, adv_scale=3.0)
    # Put the band (lb, ub) around the middle half of this batch's covariances so that several candidates
    # exist, and r = 0.1 so that several of them are zeroed.
    mask = batch["mask"]
    logp = torch.log_softmax(logits, -1).gather(-1, batch["targets"][..., None])[..., 0][mask].tolist()
    adv = batch["advantages"][:, None].expand(6, 6)[mask].tolist()
    cov = sorted(covariance(adv, logp))
    q1, q3 = len(cov) // 4, 3 * len(cov) // 4  # bounds halfway between two covariances: no token on a bound
    lb, ub = (cov[q1] + cov[q1 + 1]) / 2, (cov[q3] + cov[q3 + 1]) / 2
    config = erpo.LossConfig(method="clip_cov", clip_cov_lb=lb, clip_cov_ub=ub, clip_cov_ratio=0.1, seed=11)
    result = erpo.policy_loss(logits, batch, config)  # both draw their keys from a generator seeded with config.seed
    assert result.loss.item() == pytest.approx(expected_loss(config, logits, batch), rel=RTOL)
    assert result.metrics["masked_frac"].item() > 0


def tiny_tokens(entropy, logp, old, seq, group, seq_adv, valid=None, ref=None):
    entropy = torch.as_tensor(entropy, dtype=torch.float64)
    n = entropy.numel()
    seq = torch.as_tensor(seq)
    return Tokens(
        seq=seq, valid=torch.ones(n, dtype=torch.bool) if valid is None else torch.as_tensor(valid),
        n_seqs=len(seq_adv), logp=torch.as_tensor(logp, dtype=torch.float64), entropy=entropy,
        old=torch.as_tensor(old, dtype=torch.float64), ref=None if ref is None else torch.as_tensor(ref, dtype=torch.float64),
        seq_adv=torch.as_tensor(seq_adv, dtype=torch.float64), group=torch.as_tensor(group),
    )


def test_erpo_gamma_to_zero_and_eta_zero_is_dapo(make_batch):
    logits, batch = make_batch(B=6, L=9, V=11, empty_rows=(2,))
    erpo_loss = erpo.policy_loss(logits, batch, erpo.LossConfig(method="erpo", gamma=1e-9, eta=0)).loss
    dapo_loss = erpo.policy_loss(logits, batch, erpo.LossConfig(method="dapo")).loss
    # gamma -> 0: every gate is sigmoid(0) = 1/2, so alpha = L_i (1/2) / (L_i / 2) = 1 up to float32 rounding.
    torch.testing.assert_close(erpo_loss, dapo_loss, rtol=1e-6, atol=1e-7)


def test_redistribute_keeps_sum_of_alpha_equal_to_length():
    n = 40
    seq = torch.arange(n) // 8  # 5 responses of 8 slots
    valid = torch.rand(n) > 0.3
    valid[0:8] = False  # an empty response
    valid[8] = True
    tokens = tiny_tokens(torch.rand(n) * 4, -torch.rand(n), -torch.rand(n), seq, [0, 0, 1, 1, 1], [1.0] * 5, valid)
    config = erpo.LossConfig(method="erpo", eta=0)
    shaping = methods.erpo_advantage(config, tokens, torch.where(valid, torch.ones(n, dtype=torch.float64), 0.0))
    alpha_sums = torch.zeros(5, dtype=torch.float64).index_add_(0, seq, shaping.adv)
    lengths = torch.zeros(5, dtype=torch.float64).index_add_(0, seq, valid.double())
    torch.testing.assert_close(alpha_sums, lengths, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(shaping.adv[valid], torch.ones(int(valid.sum()), dtype=torch.float64))  # really moved


def test_redistribute_survives_underflowing_gates():
    # gamma * z of about -1e4 underflows sigmoid to 0 in every token of response 1: alpha must still sum to L_1.
    entropy = [10.0, 10.0, 0.0, 0.0]
    tokens = tiny_tokens(entropy, [-1.0] * 4, [-1.0] * 4, [0, 0, 1, 1], [0, 0], [1.0, 1.0])
    shaping = methods.erpo_advantage(erpo.LossConfig(method="erpo", eta=0, gamma=1e4), tokens, torch.ones(4, dtype=torch.float64))
    assert torch.isfinite(shaping.adv).all()
    assert shaping.adv[2:].sum().item() == pytest.approx(2.0)


def covariance(adv, logp):
    return [(a - sum(adv) / len(adv)) * (lp - sum(logp) / len(logp)) for a, lp in zip(adv, logp)]


@pytest.mark.parametrize("seed", [0, 5])
def test_clip_cov_zeroes_exactly_the_budget_from_candidates(seed):
    n = 3000
    adv = (torch.randn(n) * 3).double()
    logp = (-torch.rand(n) * 3).double()
    old = logp + 0.3 * torch.randn(n).double()
    seq = torch.arange(n) // 100
    tokens = tiny_tokens(torch.rand(n), logp, old, seq, list(range(30)), [0.0] * 30)
    config = erpo.LossConfig(method="clip_cov", clip_cov_ratio=2e-3)
    cov = covariance(adv.tolist(), logp.tolist())
    ratio = torch.exp(logp - old).tolist()
    clipped = lambda a, r: -a * min(max(r, 0.8), 1.28) > -a * r  # noqa: E731
    candidates = {j for j in range(n) if 1 < cov[j] < 5 and not clipped(adv[j].item(), ratio[j])}
    budget = min(len(candidates), max(1, math.floor(2e-3 * n)))
    assert budget == 6 and len(candidates) > budget  # the case exercises the random pick
    shaping = methods.clip_cov(config, tokens, adv, torch.Generator().manual_seed(seed))
    picked = set(shaping.masked.nonzero()[:, 0].tolist())
    assert len(picked) == budget and picked <= candidates
    assert set((shaping.keep == 0).nonzero()[:, 0].tolist()) == picked
    again = methods.clip_cov(config, tokens, adv, torch.Generator().manual_seed(seed))
    assert torch.equal(again.masked, shaping.masked)  # reproducible under a seed
    other = methods.clip_cov(config, tokens, adv, torch.Generator().manual_seed(seed + 1000))
    assert not torch.equal(other.masked, shaping.masked)


def test_clip_cov_budget_capped_by_candidates():
    # Two tokens only; budget max(1, floor(2e-4 * 2)) = 1; with no candidate in (1, 5) nothing is zeroed.
    tokens = tiny_tokens([1.0, 1.0], [-1.0, -2.0], [-1.0, -2.0], [0, 1], [0, 1], [0.0, 0.0])
    shaping = methods.clip_cov(erpo.LossConfig(method="clip_cov"), tokens, torch.tensor([1.0, -1.0], dtype=torch.float64),
                               torch.Generator().manual_seed(0))
    assert shaping.masked.sum() == 0


def test_kl_cov_penalizes_exactly_the_top_k_with_ties_to_lower_index():
    # cov = (a - mean a)(logp - mean logp): tokens 1 and 3 tie for the top, token 5 is third.
    adv = torch.tensor([0.0, 2.0, 0.0, 2.0, 0.0, 2.0, 0.0, 1.0], dtype=torch.float64)
    logp = torch.tensor([-1.0, -0.1, -1.0, -0.1, -1.0, -0.5, -1.0, -4.3], dtype=torch.float64)
    cov = covariance(adv.tolist(), logp.tolist())
    order = sorted(range(8), key=lambda j: (-cov[j], j))
    assert cov[1] == cov[3] and order[:3] == [1, 3, 5]
    tokens = tiny_tokens(torch.ones(8), logp, logp, torch.arange(8), list(range(8)), [0.0] * 8)
    for ratio, k in ((0.375, 3), (0.125, 1)):  # k = max(1, floor(ratio * 8)); k = 1 splits the tie: index 1 wins
        shaping = methods.kl_cov(erpo.LossConfig(method="kl_cov", kl_cov_ratio=ratio, kl_cov_beta=0.7), tokens, adv)
        assert shaping.klcov_w.tolist() == [0.7 if j in order[:k] else 0.0 for j in range(8)]
    # a 3-way tie at the top with k = 2 keeps the two lowest indices
    adv3 = torch.tensor([2.0, 2.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    lp3 = torch.tensor([-0.1, -0.1, -0.1, -2.0, -2.0, -2.0, -2.0, -2.0], dtype=torch.float64)
    shaping = methods.kl_cov(erpo.LossConfig(method="kl_cov", kl_cov_ratio=0.25), tiny_tokens(
        torch.ones(8), lp3, lp3, torch.arange(8), list(range(8)), [0.0] * 8), adv3)
    assert shaping.masked.tolist() == [True, True] + [False] * 6


@pytest.mark.parametrize("n_valid, rho, kept", [(10, 0.2, 2), (50, 0.2, 10), (7, 1.0, 7), (1, 0.2, 1)])
def test_high_entropy_mask_keeps_the_top_rho(n_valid, rho, kept):
    n = n_valid + 5
    entropy = torch.randperm(n).double() + torch.rand(n).double() * 0.5  # distinct
    valid = torch.zeros(n, dtype=torch.bool)
    valid[torch.randperm(n)[:n_valid]] = True
    tokens = tiny_tokens(entropy, -torch.rand(n), -torch.rand(n), torch.zeros(n, dtype=torch.long), [0], [1.0], valid)
    shaping = methods.high_entropy_mask(erpo.LossConfig(method="high_entropy_mask", rho=rho), tokens,
                                        torch.where(valid, 1.0, 0.0).double())
    kept_idx = set((shaping.adv != 0).nonzero()[:, 0].tolist())
    valid_idx = valid.nonzero()[:, 0].tolist()
    top = set(sorted(valid_idx, key=lambda j: -entropy[j].item())[:kept])
    assert kept_idx == top
    assert shaping.masked.sum().item() == n_valid - kept
