"""The per-token kernel (Triton, under the interpreter on CPU) against its torch twin, and the twin's
analytic derivatives against autograd of the spec's formula."""
import itertools
import math

import pytest
import torch

from erpo.losses.token_loss import TokenParams, token_terms, token_terms_torch
from tests.conftest import DEVICE, KERNEL_BACKENDS


def params(**overrides):
    base = dict(eps_low=0.2, eps_high=0.28, dual_clip=False, dual_clip_c=3.0, kl_coef=0.0, kl_estimator="k3",
                entropy_coef=0.0, no_clip=False)
    return TokenParams(**{**base, **overrides})


def inputs(n, dtype=torch.float32):
    logp = -torch.rand(n, dtype=dtype) * 4
    return dict(
        logp=logp,
        entropy=torch.rand(n, dtype=dtype) * 3,
        old=logp + 0.4 * torch.randn(n, dtype=dtype),  # ratios on both sides of both clip bounds
        adv=torch.randn(n, dtype=dtype),
        ref=logp + 0.5 * torch.randn(n, dtype=dtype),
        klcov_w=(torch.rand(n) < 0.3).to(dtype) * 0.7,
    )


def test_hand_numbers():
    # ratio = e^{log 1.5} = 1.5 with a = 1: clipped at 1 + 0.28 -> l = -1.28, zero gradient, clip_high.
    # ratio = 0.5 with a = -2: -min(0.5 * -2, 0.8 * -2) = 1.6, clip_low, gradient 0.
    # ratio = 1.1 with a = 0.5: inside the band: l = -0.55, dl/dlogp = -0.55.
    logp = torch.tensor([math.log(1.5), math.log(0.5), math.log(1.1)], dtype=torch.float64)
    zero = torch.zeros(3, dtype=torch.float64)
    adv = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    loss, dlogp, dent, low, high = token_terms_torch(logp, zero, zero, adv, None, None, params())
    torch.testing.assert_close(loss, torch.tensor([-1.28, 1.6, -0.55], dtype=torch.float64))
    torch.testing.assert_close(dlogp, torch.tensor([0.0, 0.0, -0.55], dtype=torch.float64))
    assert low.tolist() == [False, True, False] and high.tolist() == [True, False, False]
    # dual clip c = 3 on a = -2, ratio = 4: -min(4 * -2, 1.28 * -2) = 8 > -c a = 6 -> 6, no gradient.
    loss, dlogp, *_ = token_terms_torch(
        torch.tensor([math.log(4.0)]), torch.zeros(1), torch.zeros(1), torch.tensor([-2.0]), None, None,
        params(dual_clip=True))
    assert loss.tolist() == pytest.approx([6.0]) and dlogp.tolist() == [0.0]
    # k3 with logp - ref = log 2: e^{-log 2} + log 2 - 1 = 0.5 + 0.6931 - 1; derivative 1 - 0.5.
    loss, dlogp, *_ = token_terms_torch(
        torch.tensor([math.log(2.0)]), torch.zeros(1), torch.tensor([math.log(2.0)]), torch.zeros(1),
        torch.zeros(1), None, params(kl_coef=0.1))
    assert loss.item() == pytest.approx(0.1 * (0.5 + math.log(2) - 1)) and dlogp.item() == pytest.approx(0.05)


def spec_token_loss(logp, entropy, old, adv, ref, klcov_w, p: TokenParams):
    """The spec's per-token formula written directly (autograd differentiates it)."""
    ratio = torch.exp(logp - old)
    if p.no_clip:
        pg = -ratio * adv
    else:
        pg = -torch.min(ratio * adv, torch.clamp(ratio, 1 - p.eps_low, 1 + p.eps_high) * adv)
        if p.dual_clip:
            pg = torch.where(adv < 0, torch.min(pg, -p.dual_clip_c * adv), pg)
    d = logp - ref
    kl = {"k1": d, "k2": 0.5 * d ** 2, "k3": torch.exp(ref - logp) - (ref - logp) - 1}[p.kl_estimator]
    return pg + p.kl_coef * kl - p.entropy_coef * entropy + klcov_w * (logp - old).abs()


MODES = [
    dict(),
    dict(dual_clip=True),
    dict(no_clip=True),
    dict(kl_coef=0.04, kl_estimator="k1"),
    dict(kl_coef=0.3, kl_estimator="k2", entropy_coef=0.01),
    dict(kl_coef=0.04, kl_estimator="k3", dual_clip=True, entropy_coef=-0.02),
]


@pytest.mark.parametrize("mode", MODES)
def test_torch_twin_derivatives_match_autograd_float64(mode):
    p = params(**mode)
    x = inputs(257, torch.float64)
    logp = x["logp"].clone().requires_grad_()
    entropy = x["entropy"].clone().requires_grad_()
    expected = spec_token_loss(logp, entropy, x["old"], x["adv"], x["ref"], x["klcov_w"], p)
    g_logp, g_ent = torch.autograd.grad(expected.sum(), (logp, entropy))
    loss, dlogp, dent, *_ = token_terms_torch(
        x["logp"], x["entropy"], x["old"], x["adv"], x["ref"] if p.kl_coef else None, x["klcov_w"], p)
    # Same formula in float64: only rounding differs.
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dlogp, g_logp, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dent, g_ent, rtol=0, atol=0)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("mode, n", list(itertools.product(MODES, [1, 1500])))
def test_kernel_matches_torch_twin(mode, n, backend):
    p = params(**mode)
    x = {name: value.to(DEVICE) for name, value in inputs(n).items()}
    ref = x["ref"] if p.kl_coef else None
    klcov = x["klcov_w"] if p.no_clip else None
    got = token_terms(x["logp"], x["entropy"], x["old"], x["adv"], ref, klcov, p, backend)
    want = token_terms_torch(x["logp"], x["entropy"], x["old"], x["adv"], ref, klcov, p)
    # float32 both; exp in Triton vs torch may differ by an ulp or two.
    for g, w in zip(got[:3], want[:3]):
        torch.testing.assert_close(g, w, rtol=2e-6, atol=2e-6)
    for g, w in zip(got[3:], want[3:]):
        assert g.dtype == torch.bool and torch.equal(g, w)
