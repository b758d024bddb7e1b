import math

import pytest
import torch

import erpo

# Group 9: rewards 1,0,1,0 (mean 0.5, sample std sqrt(1/3)); group 4: equal rewards; group 1: one response.
REWARDS = torch.tensor([1.0, 0.0, 2.0, 1.0, 2.0, 0.0, 5.0])
GROUPS = torch.tensor([9, 9, 4, 9, 4, 9, 1])


def test_grpo_by_hand():
    out = erpo.advantages.grpo(REWARDS, GROUPS)
    a = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    expected = torch.tensor([a, -a, 0.0, a, 0.0, -a, 0.0])
    torch.testing.assert_close(out.advantages, expected, rtol=1e-6, atol=0)
    assert out.degenerate.tolist() == [False, False, True, False, True, False, True]
    assert int(out.n_degenerate_groups) == 2


def test_dr_grpo_and_rloo_by_hand():
    torch.testing.assert_close(
        erpo.advantages.dr_grpo(REWARDS, GROUPS).advantages, torch.tensor([0.5, -0.5, 0, 0.5, 0, -0.5, 0]))
    # rloo: 1 - mean(0, 1, 0) = 2/3 ; 0 - mean(1, 1, 0) = -2/3
    torch.testing.assert_close(
        erpo.advantages.rloo(REWARDS, GROUPS).advantages, torch.tensor([2 / 3, -2 / 3, 0, 2 / 3, 0, -2 / 3, 0]))


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo"])
def test_random_groups_against_a_loop(estimator):
    rewards = torch.randn(24, dtype=torch.float64)
    groups = torch.randint(0, 5, (24,)) * 11 - 20
    out = getattr(erpo.advantages, estimator)(rewards, groups)
    for g in groups.unique().tolist():
        idx = (groups == g).nonzero()[:, 0]
        r = rewards[idx]
        if len(idx) == 1:
            expected = torch.zeros(1, dtype=torch.float64)
        elif estimator == "grpo":
            expected = (r - r.mean()) / (r.std() + 1e-6)
        elif estimator == "dr_grpo":
            expected = r - r.mean()
        else:
            expected = r - (r.sum() - r) / (len(idx) - 1)
        torch.testing.assert_close(out.advantages[idx], expected, rtol=1e-12, atol=1e-12)


def test_shape_errors():
    with pytest.raises(ValueError, match="shape"):
        erpo.advantages.grpo(torch.zeros(3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="integers"):
        erpo.advantages.grpo(torch.zeros(3), torch.zeros(3))
