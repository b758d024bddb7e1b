"""CISPO's clip flags (and so clip_frac_high / clip_frac_low) count, like every objective's and like TRL 1.16's
`cispo_clip_ratio` ((coef_1 > epsilon_high) & (A > 0)) and Liger's `is_clipped`, only the side of the cap that binds
for the advantage's sign: a > 0 above the upper bound, a < 0 below the lower one. The weight itself is capped
whatever the sign (loss and gradient unchanged). Checked on every backend that computes the flags: the torch twin,
the Triton kernel (interpreter on CPU) and the CUDA kernel's arithmetic (csrc/token_loss_math.h through the g++
host shim)."""
import shutil

import pytest
import torch

import erpo
from erpo.losses.token_loss import TokenExtras, TokenParams, token_terms, token_terms_torch
from tests.conftest import DEVICE

# ratio and advantage per token: above the cap with a > 0 (counted high), above it with a < 0 (not counted),
# below 1 - eps_low with a < 0 (counted low under two_sided), below it with a > 0 (not counted), inside the range.
RATIOS = [2.0, 2.0, 0.5, 0.5, 1.0, 1.6, 1.6]
ADVS = [1.0, -1.0, -1.0, 1.0, 1.0, 0.5, -0.5]


def params(clip):
    return TokenParams(eps_low=0.2, eps_high=0.28, dual_clip=False, dual_clip_c=3.0, kl_coef=0.0, kl_estimator="k3",
                       entropy_coef=0.0, objective="cispo", cispo_clip=clip, cispo_max=1.5)


def inputs():
    logp = torch.full((len(RATIOS),), -1.0)
    old = logp - torch.log(torch.tensor(RATIOS))
    return logp, torch.rand(len(RATIOS)), old, torch.tensor(ADVS)


# expected (clip_low, clip_high) per token
EXPECTED = {
    "upper": ([False] * 7, [True, False, False, False, False, True, False]),  # cap 1.5: 2.0 and 1.6 with a > 0
    "two_sided": ([False, False, True, False, False, False, False],  # [0.8, 1.28]: 0.5 with a < 0
                  [True, False, False, False, False, True, False]),
}


@pytest.fixture(scope="module")
def shim(tmp_path_factory):
    if shutil.which("g++") is None:
        pytest.skip("g++ is not installed: the CUDA kernel's arithmetic cannot be built on the host")
    from tests.csrc import host_shim

    return host_shim.build(tmp_path_factory.mktemp("host_shim"))


def _check(got, clip, what):
    low, high = EXPECTED[clip]
    assert got[3].tolist() == low, f"{what} {clip}: clip_low {got[3].tolist()}"
    assert got[4].tolist() == high, f"{what} {clip}: clip_high {got[4].tolist()}"


@pytest.mark.parametrize("clip", ["upper", "two_sided"])
def test_torch_twin_counts_the_binding_side_only(clip):
    logp, entropy, old, adv = inputs()
    _check(token_terms_torch(logp, entropy, old, adv, None, None, params(clip)), clip, "torch")


@pytest.mark.parametrize("clip", ["upper", "two_sided"])
def test_triton_kernel_counts_the_binding_side_only(clip):
    logp, entropy, old, adv = (t.to(DEVICE) for t in inputs())
    got = token_terms(logp, entropy, old, adv, None, None, params(clip), "triton", TokenExtras())
    _check([t.cpu() for t in got], clip, "triton")


@pytest.mark.parametrize("clip", ["upper", "two_sided"])
def test_cuda_kernel_arithmetic_counts_the_binding_side_only(shim, clip):
    from tests.csrc import host_shim

    logp, entropy, old, adv = inputs()
    _check(host_shim.token_terms(shim, logp, entropy, old, adv, None, None, params(clip)), clip, "cuda (host)")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_clip_frac_high_is_trls_cispo_clip_ratio(backend):
    """policy_loss's clip_frac_high under the cispo preset == TRL's cispo_clip_ratio: the share of valid tokens with
    ratio > cispo_max and A > 0 (advantages of both signs, ratios on both sides of the cap)."""
    logp = torch.log(torch.rand(6, 8) * 0.9 + 0.05)
    old = -(logp - torch.randn(6, 8) * 0.8).abs()  # log-probs: <= 0
    mask = torch.rand(6, 8) > 0.2
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.3, 2.0, -2.0])
    entropy = torch.rand(6, 8)
    config = erpo.LossConfig(method="cispo", cispo_max=1.3, backend=backend)
    result = erpo.token_policy_loss(logp.to(DEVICE), entropy.to(DEVICE),
                                    {"mask": mask.to(DEVICE), "old_logp": old.to(DEVICE),
                                     "advantages": advantages.to(DEVICE)}, config)
    ratio = torch.exp(logp - old)
    trl = ((ratio > 1.3) & (advantages[:, None] > 0) & mask).sum() / mask.sum()
    wrong = ((ratio > 1.3) & mask).sum() / mask.sum()
    assert trl != wrong, "the inputs must tell the two counts apart"
    assert result.metrics["clip_frac_high"].item() == pytest.approx(trl.item(), rel=1e-6)
    assert result.metrics["clip_frac_low"].item() == 0.0
