"""The per-token policy-loss arithmetic of the CUDA kernel (csrc/token_loss_math.h), run on the CPU through the
g++ shim, against the torch twin (erpo.losses.token_loss.token_terms_torch) evaluated in float64.

Tolerance: the kernel works in float32 on float32 inputs (upcast exactly to float64 for the reference), so
each output carries a few float32 roundings of the quantities it is built from: log_ratio = logp - old is
rounded relative to |logp| + |old|, and the loss adds terms of size |a| ratio, kl_coef |k|, |coef H| and
w |log_ratio|. We allow 16 * 2^-24 * (1 + |logp| + |old| + |ref|) * (size of the summed terms). Tokens
within 1e-4 of a kink (a clip bound, the dual-clip bound, log_ratio = 0) are left out of the gradient and
indicator comparisons, where a rounding may legitimately pick the other side.
"""
import itertools

import pytest
import torch

from erpo.losses.token_loss import TokenParams, token_terms_torch
from tests.csrc import host_shim as hs

EPS32 = 2.0**-24
N = 4000


def _inputs(with_ref, with_klcov):
    logp = -torch.rand(N) * 6
    # Ratios spread across both clip bounds, and 15% far out (ratio > c = 3 happens: the dual-clip cap).
    old = logp + torch.randn(N) * torch.where(torch.rand(N) < 0.15, 1.5, 0.3)
    adv = torch.randn(N) * 2
    entropy = torch.rand(N) * 3
    ref = logp + torch.randn(N) * 0.5 if with_ref else None
    klcov = (torch.rand(N) < 0.2).float() * torch.rand(N) if with_klcov else None
    return logp, entropy, old, adv, ref, klcov


CONFIGS = list(itertools.product((False, True), (False, True), ("k1", "k2", "k3"), (False, True), (False, True)))


@pytest.mark.parametrize("no_clip,dual_clip,kl_estimator,with_ref,with_klcov", CONFIGS)
def test_token_terms_match_float64_twin(shim, no_clip, dual_clip, kl_estimator, with_ref, with_klcov):
    params = TokenParams(eps_low=0.2, eps_high=0.28, dual_clip=dual_clip, dual_clip_c=3.0, kl_coef=0.04,
                         kl_estimator=kl_estimator, entropy_coef=0.01,
                         objective="plain" if no_clip else "clip")
    inputs = _inputs(with_ref, with_klcov)
    got = hs.token_terms(shim, *inputs, params)
    want = token_terms_torch(*[None if t is None else t.double() for t in inputs], params)
    logp, entropy, old, adv, ref, klcov = inputs
    ratio = torch.exp(logp.double() - old.double())
    size = 1 + logp.abs() + old.abs() + (ref.abs() if ref is not None else 0)
    terms = 1 + adv.abs() * (1 + ratio) + entropy + (klcov * (logp - old).abs() if klcov is not None else 0)
    if ref is not None:
        terms = terms + params.kl_coef * (1 + (ref - logp).abs() + torch.exp(ref.double() - logp.double()))
    tol = 16 * EPS32 * size * terms
    low, high = 1 - params.eps_low, 1 + params.eps_high
    log_ratio = (logp - old).double()
    kink = ((ratio - low).abs() < 1e-4) | ((ratio - high).abs() < 1e-4) | (log_ratio.abs() < 1e-4)
    if dual_clip:
        pg = want[0] + params.entropy_coef * entropy.double()
        if ref is not None or klcov is not None:
            kink |= adv < 0  # the bound test uses pg before the KL/KL-Cov terms: cannot rebuild it here, skip
        else:
            kink |= (pg + params.dual_clip_c * adv.double()).abs() < 1e-4
    names = ("loss", "dlogp", "dentropy")
    for name, a, b in zip(names, got[:3], want[:3]):
        keep = ~kink if name == "dlogp" else torch.ones(N, dtype=torch.bool)
        err = (a.double() - b)[keep].abs()
        worst = int((err / tol[keep]).argmax())
        assert bool((err <= tol[keep]).all()), f"{name}: error {float(err[worst]):.3g} > {float(tol[keep][worst]):.3g}"
    for name, a, b in zip(("clip_low", "clip_high"), got[3:], want[3:]):
        assert torch.equal(a[~kink], b[~kink]), name
    assert bool(got[3].any() or no_clip) and bool(got[4].any() or no_clip), "the inputs must hit both clip bounds"
    if dual_clip and not no_clip:
        capped = (adv < 0) & (ratio > params.dual_clip_c)
        assert int(capped.sum()) >= 10, "the inputs must hit the dual-clip cap"


def test_nan_ratio_stays_nan(shim):
    """A NaN log-prob must reach the loss, never be replaced by a clip bound (fmaxf/fminf would do that)."""
    params = TokenParams(0.2, 0.2, False, 3.0, 0.0, "k3", 0.0)
    logp = torch.tensor([float("nan"), -1.0])
    old, adv = torch.tensor([-1.0, -1.0]), torch.tensor([1.0, -1.0])
    got = hs.token_terms(shim, logp, torch.ones(2), old, adv, None, None, params)
    assert torch.isnan(got[0][0]) and torch.isfinite(got[0][1])


# ---- every objective and TokenExtras field: the host-compiled kernel code against the float32 twin

from tests.losses.test_token_kernel import (  # noqa: E402  (the Triton kernel's cases, shared)
    EXTRA_FIELDS, OBJECTIVE_OPTIONS, assert_kernel_equals_twin, grid, make_extras, segment_inputs, twin_args,
    twin_extras)


@pytest.mark.parametrize("objective", list(OBJECTIVE_OPTIONS))
def test_every_objective_and_extras_subset_matches_float32_twin(shim, objective):
    """token_loss_math.h (the CUDA kernel's code) = token_terms_torch in float32, to a few ulps, for every
    extras subset x KL bias correction with the objective's options and KL estimators cycled; NaN inputs too."""
    for i, (p, chosen) in enumerate(grid(objective)):
        x, seq = segment_inputs(301)
        e = make_extras(301, chosen, seq)
        if i % 8 == 0:  # NaN in the inputs and extras: the same NaN positions as the twin
            for name in ("logp", "old", "adv", "ref"):
                x[name][i % 5::37] = float("nan")
            for name in chosen:
                getattr(e, name)[3::41] = float("nan")
        got = hs.token_terms(shim, *twin_args(x, p), p, e)
        want = token_terms_torch(*twin_args(x, p), p, twin_extras(e, p))
        assert_kernel_equals_twin(got, want, f"{p} with {sorted(chosen)}")


def test_nan_ratio_stays_nan_every_objective(shim):
    """NaN log-ratio: NaN loss for every objective whose term uses the ratio (clip with delta, cispo, sapo)."""
    logp = torch.tensor([float("nan"), -1.0])
    old, adv = torch.tensor([-1.0, -1.0]), torch.tensor([1.0, -1.0])
    for option in (dict(objective="clip", delta=1.5), dict(objective="cispo"),
                   dict(objective="cispo", cispo_clip="two_sided"), dict(objective="sapo")):
        params = TokenParams(0.2, 0.2, False, 3.0, 0.0, "k3", 0.0, **option)
        got = hs.token_terms(shim, logp, torch.ones(2), old, adv, None, None, params)
        assert torch.isnan(got[0][0]) and torch.isfinite(got[0][1]), option


def test_objective_codes_have_one_definition():
    """erpo.losses.objectives.Objective is the definition of the objective codes: the Triton kernel's constants,
    csrc/token_loss_math.h's enum and TokenParams.objective_code equal it."""
    import re
    from pathlib import Path

    from erpo.kernels import policy_loss as kernel
    from erpo.losses.objectives import OBJECTIVES, Objective

    header = (Path(__file__).resolve().parents[2] / "csrc" / "token_loss_math.h").read_text()
    enum = re.search(r"enum Objective \{([^}]*)\}", header).group(1)
    definition = {o.name: o.value for o in Objective}
    assert {name[1:].upper(): int(code) for name, code in re.findall(r"(k\w+) = (\d+)", enum)} == definition
    assert {name: getattr(kernel, name).value for name in definition} == definition
    assert {name: TokenParams(0.2, 0.2, False, 3.0, 0.0, "k3", 0.0, objective=name).objective_code
            for name in OBJECTIVES} == {o.name.lower(): o.value for o in Objective}
