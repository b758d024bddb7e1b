"""The per-token kernel (Triton, under the interpreter on CPU) against its torch twin, and the twin's
analytic derivatives against autograd of the spec's formula."""
import dataclasses
import itertools
import math

import pytest
import torch

from erpo.losses.token_loss import TokenExtras, TokenParams, token_terms, token_terms_torch
from tests.conftest import DEVICE, KERNEL_BACKENDS


def params(**overrides):
    base = dict(eps_low=0.2, eps_high=0.28, dual_clip=False, dual_clip_c=3.0, kl_coef=0.0, kl_estimator="k3",
                entropy_coef=0.0)
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


MODES = [
    dict(),
    dict(dual_clip=True),
    dict(objective="plain"),
    dict(kl_coef=0.04, kl_estimator="k1"),
    dict(kl_coef=0.3, kl_estimator="k2", entropy_coef=0.01),
    dict(kl_coef=0.04, kl_estimator="k3", dual_clip=True, entropy_coef=-0.02),
]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("mode, n", list(itertools.product(MODES, [1, 1500])))
def test_kernel_matches_torch_twin(mode, n, backend):
    p = params(**mode)
    x = {name: value.to(DEVICE) for name, value in inputs(n).items()}
    ref = x["ref"] if p.kl_coef else None
    klcov = x["klcov_w"] if p.objective == "plain" else None
    got = token_terms(x["logp"], x["entropy"], x["old"], x["adv"], ref, klcov, p, backend)
    want = token_terms_torch(x["logp"], x["entropy"], x["old"], x["adv"], ref, klcov, p)
    # float32 both; exp in Triton vs torch may differ by an ulp or two.
    for g, w in zip(got[:3], want[:3]):
        torch.testing.assert_close(g, w, rtol=2e-6, atol=2e-6)
    for g, w in zip(got[3:], want[3:]):
        assert g.dtype == torch.bool and torch.equal(g, w)


# ---- every objective x every TokenExtras field x the params: the kernel against the twin, the twin against autograd

EXTRA_FIELDS = ("log_ratio", "seq_coef", "eps_low", "eps_high", "kl_weight", "pg_weight")
NEEDS_SEQ_COEF = ("vespo", "gmpo")
# Each objective's own options.
OBJECTIVE_OPTIONS = {
    "clip": [dict(), dict(delta=1.5), dict(dual_clip=True), dict(delta=1.5, dual_clip=True)],
    "plain": [dict()],
    "cispo": [dict(cispo_clip="upper", cispo_max=1.4), dict(cispo_clip="two_sided")],
    "sapo": [dict(sapo_tau_pos=1.0, sapo_tau_neg=1.05), dict(sapo_tau_pos=2.0, sapo_tau_neg=0.5)],
    "vespo": [dict()],
    "gpg": [dict()],
    "gmpo": [dict()],
}
KL_MODES = [dict(kl_coef=0.0), dict(kl_coef=0.04, kl_estimator="k1"), dict(kl_coef=0.3, kl_estimator="k2"),
            dict(kl_coef=0.1, kl_estimator="k3")]


def extras_subsets(objective):
    """Every subset of the TokenExtras fields the objective can take (seq_coef is required by vespo and gmpo)."""
    for bits in itertools.product([False, True], repeat=len(EXTRA_FIELDS)):
        chosen = {name for name, on in zip(EXTRA_FIELDS, bits) if on}
        if objective in NEEDS_SEQ_COEF and "seq_coef" not in chosen:
            continue
        yield frozenset(chosen)


def grid(objective):
    """(params, extras names) covering every extras subset x KL bias correction on/off, with the objective's
    options and the KL estimators cycled so that each option meets each estimator."""
    options = OBJECTIVE_OPTIONS[objective]
    cases = []
    for i, (chosen, bias) in enumerate(itertools.product(extras_subsets(objective), [False, True])):
        option, kl = options[i % len(options)], KL_MODES[(i // len(options)) % len(KL_MODES)]
        entropy_coef = (0.0, 0.013, -0.02)[i % 3]
        p = params(**{"objective": objective, "kl_bias_correction": bias, "entropy_coef": entropy_coef, **kl, **option})
        cases.append((p, chosen))
    return cases


def segments(n):
    """[N] response ids: responses of random lengths 1..40 (the last one cut at n)."""
    lengths = torch.randint(1, 41, (n,))
    return torch.repeat_interleave(torch.arange(n), lengths)[:n]


def make_extras(n, chosen, seq, dtype=torch.float32):
    """Random TokenExtras with the chosen fields; per-response fields constant within a response."""
    per_seq = lambda values: values[seq]  # noqa: E731
    s = int(seq.max()) + 1 if n else 0
    values = dict(
        log_ratio=per_seq(0.35 * torch.randn(s, dtype=dtype)),  # GSPO's log s_i
        seq_coef=per_seq(torch.exp(0.3 * torch.randn(s, dtype=dtype))),
        eps_low=torch.where(torch.rand(n) < 0.5, 0.1, 0.25).to(dtype),
        eps_high=torch.where(torch.rand(n) < 0.5, 0.15, 0.3).to(dtype),
        kl_weight=(torch.rand(n) < 0.7).to(dtype),
        pg_weight=per_seq(torch.where(torch.rand(s) < 0.2, 0.0, 2 * torch.rand(s)).to(dtype)),
    )
    return TokenExtras(**{name: values[name] for name in chosen})


def segment_inputs(n, dtype=torch.float32):
    seq = segments(n)
    x = inputs(n, dtype)
    s = int(seq.max()) + 1 if n else 0
    x["adv"] = torch.randn(s, dtype=dtype)[seq]  # one advantage per response (GMPO's sign is the response's)
    return x, seq


def twin_extras(e: TokenExtras, p: TokenParams) -> TokenExtras:
    """The twin's torch.clamp takes both bounds as numbers or both as tensors (a mix raises TypeError): where
    only one of eps_low/eps_high is a tensor, give the twin the other as a tensor of its scalar (same values).
    The kernel takes the mix directly."""
    if (e.eps_low is None) == (e.eps_high is None):
        return e
    like = e.eps_low if e.eps_low is not None else e.eps_high
    fill = lambda value: torch.full_like(like, value)  # noqa: E731
    return dataclasses.replace(e, eps_low=fill(p.eps_low) if e.eps_low is None else e.eps_low,
                               eps_high=fill(p.eps_high) if e.eps_high is None else e.eps_high)


def kl_term(p, logp, ref):
    d = logp - ref
    return {"k1": d, "k2": 0.5 * d ** 2, "k3": torch.exp(ref - logp) - (ref - logp) - 1}[p.kl_estimator]


def spec_loss(logp, entropy, x, p: TokenParams, e: TokenExtras, seq):
    """The per-token loss written from the objectives' definitions, with the stop-gradients each one states;
    autograd differentiates it. The sequence ratio is GSPO-token's sg(s_i) exp(logp - sg(logp)); GMPO's
    ratio is the response's geometric mean of the chosen token ratios, differentiated as a whole."""
    old, adv = x["old"], x["adv"]
    lr = logp - old if e.log_ratio is None else e.log_ratio + logp - logp.detach()
    r = torch.exp(lr)
    el = p.eps_low if e.eps_low is None else e.eps_low
    eh = p.eps_high if e.eps_high is None else e.eps_high
    objective = p.objective
    if objective == "plain":
        pg = -r * adv
    elif objective == "clip":
        capped = r if p.delta is None else torch.clamp(r, max=p.delta)
        pg = -torch.minimum(capped * adv, torch.clamp(r, 1 - el, 1 + eh) * adv)
        if p.dual_clip:
            pg = torch.where(adv < 0, torch.minimum(pg, -p.dual_clip_c * adv), pg)
    elif objective == "cispo":
        w = torch.clamp(r, max=p.cispo_max) if p.cispo_clip == "upper" else torch.clamp(r, 1 - el, 1 + eh)
        pg = -w.detach() * adv * logp
    elif objective == "sapo":
        tau = torch.where(adv > 0, p.sapo_tau_pos, p.sapo_tau_neg).to(logp.dtype)
        pg = -adv * torch.sigmoid(tau * (r - 1)) * 4 / tau
    elif objective == "vespo":
        pg = -e.seq_coef * adv * logp
    elif objective == "gpg":
        pg = -adv * logp
    else:  # gmpo
        sign = torch.sign(adv)
        chosen = sign * torch.minimum(sign * lr, sign * torch.clamp(lr, -el, eh))
        n_seqs = int(seq.max()) + 1
        mean = torch.zeros(n_seqs, dtype=lr.dtype).index_add(0, seq, chosen) / torch.bincount(seq, minlength=n_seqs)
        pg = -adv * torch.exp(mean)[seq]
    if e.pg_weight is not None:
        pg = pg * e.pg_weight
    loss = pg - p.entropy_coef * entropy
    if p.kl_coef:
        kl = kl_term(p, logp, x["ref"]) * (r if p.kl_bias_correction else 1.0)
        loss = loss + p.kl_coef * (1.0 if e.kl_weight is None else e.kl_weight) * kl
    return loss + x["klcov_w"] * (logp - old).abs()


def gmpo_coef(x, e: TokenExtras, p: TokenParams, seq):
    """GMPO's seq_coef for these inputs: the spec's geometric-mean ratio, detached (the twin takes it as given)."""
    lr = x["logp"] - x["old"] if e.log_ratio is None else e.log_ratio
    el = p.eps_low if e.eps_low is None else e.eps_low
    eh = p.eps_high if e.eps_high is None else e.eps_high
    sign = torch.sign(x["adv"])
    chosen = sign * torch.minimum(sign * lr, sign * torch.clamp(lr, -el, eh))
    n_seqs = int(seq.max()) + 1
    mean = torch.zeros(n_seqs, dtype=lr.dtype).index_add(0, seq, chosen) / torch.bincount(seq, minlength=n_seqs)
    return torch.exp(mean)[seq]


def twin_args(x, p: TokenParams):
    ref = x["ref"] if p.kl_coef else None
    klcov = x["klcov_w"] if p.objective == "plain" else None
    return x["logp"], x["entropy"], x["old"], x["adv"], ref, klcov


@pytest.mark.parametrize("objective", list(OBJECTIVE_OPTIONS))
def test_twin_derivatives_match_autograd_every_objective_and_extras(objective):
    """The twin's analytic dloss/dlogp and dloss/dH = autograd of the spec's loss, float64, for every extras
    subset: each response's token-mean of the loss is differentiated (GMPO's gradient runs through its
    response's geometric mean, so the check is over responses, not single tokens)."""
    for p, chosen in grid(objective):
        x, seq = segment_inputs(301, torch.float64)
        e = twin_extras(make_extras(301, chosen, seq, torch.float64), p)
        if objective == "gmpo":
            e.seq_coef = gmpo_coef(x, e, p, seq)
        logp = x["logp"].clone().requires_grad_()
        entropy = x["entropy"].clone().requires_grad_()
        klcov_x = dict(x, klcov_w=x["klcov_w"] if p.objective == "plain" else torch.zeros_like(x["old"]))
        expected = spec_loss(logp, entropy, klcov_x, p, e, seq)
        weight = 1.0 / torch.bincount(seq).to(torch.float64)[seq]  # token-mean within each response
        g_logp, g_ent = torch.autograd.grad((weight * expected).sum(), (logp, entropy))
        loss, dlogp, dent, *_ = token_terms_torch(*twin_args(x, p), p, e)
        what = f"{p} with {sorted(chosen)}"
        torch.testing.assert_close(loss, expected.detach(), rtol=1e-12, atol=1e-12, msg=lambda m: f"{what}: {m}")
        torch.testing.assert_close(weight * dlogp, g_logp, rtol=1e-10, atol=1e-12, msg=lambda m: f"{what}: {m}")
        torch.testing.assert_close(weight * dent, g_ent, rtol=1e-12, atol=0, msg=lambda m: f"{what}: {m}")


def on_device(x, e: TokenExtras):
    return ({k: v.to(DEVICE) for k, v in x.items()},
            TokenExtras(**{f: None if getattr(e, f) is None else getattr(e, f).to(DEVICE) for f in EXTRA_FIELDS}))


def assert_kernel_equals_twin(got, want, what):
    # Both float32 and the same operations in the same order; exp/sigmoid in Triton (numpy under the
    # interpreter) and torch may differ by an ulp, which a product carries on: a few ulps of the magnitude.
    for name, g, w in zip(("loss", "dlogp", "dentropy"), got[:3], want[:3]):
        assert g.dtype == torch.float32 and g.shape == w.shape, f"{what}: {name} {g.dtype} {g.shape}"
        torch.testing.assert_close(g, w, rtol=4e-6, atol=4e-6, equal_nan=True, msg=lambda m: f"{what}: {name}: {m}")
    for name, g, w in zip(("clip_low", "clip_high"), got[3:], want[3:]):
        assert g.dtype == torch.bool and torch.equal(g, w), f"{what}: {name} differs at {(g != w).nonzero()[:5]}"


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("objective", list(OBJECTIVE_OPTIONS))
def test_kernel_matches_twin_every_extras_subset(objective, backend):
    """Odd N past one block, every extras subset x KL bias correction, options and KL estimators cycled."""
    n = 1031  # not a multiple of BLOCK: the second program is partly masked
    flags_seen = [False, False]
    for p, chosen in grid(objective):
        x, seq = segment_inputs(n)
        x, e = on_device(x, make_extras(n, chosen, seq))
        got = token_terms(*twin_args(x, p), p, backend, e)
        want = token_terms_torch(*twin_args(x, p), p, twin_extras(e, p))
        assert_kernel_equals_twin(got, want, f"{p} with {sorted(chosen)}")
        flags_seen[0] |= bool(want[3].any())
        flags_seen[1] |= bool(want[4].any())
    if objective in ("clip", "cispo", "gmpo"):  # the inputs make the clips bind on both sides
        assert all(flags_seen), flags_seen


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("objective", list(OBJECTIVE_OPTIONS))
def test_kernel_matches_twin_all_params_with_all_extras(objective, backend):
    """Every option x KL estimator x bias correction x entropy coefficient, all extras given, N = 1 and odd."""
    for option, kl, bias, entropy_coef, n in itertools.product(
            OBJECTIVE_OPTIONS[objective], KL_MODES, [False, True], [0.0, 0.01], [1, 77]):
        p = params(**{"objective": objective, "kl_bias_correction": bias, "entropy_coef": entropy_coef, **kl, **option})
        x, seq = segment_inputs(n)
        x, e = on_device(x, make_extras(n, EXTRA_FIELDS, seq))
        got = token_terms(*twin_args(x, p), p, backend, e)
        want = token_terms_torch(*twin_args(x, p), p, twin_extras(e, p))
        assert_kernel_equals_twin(got, want, f"{p} n={n}")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("objective", list(OBJECTIVE_OPTIONS))
def test_kernel_propagates_nan_like_twin(objective, backend):
    """NaN in logp, old, adv, ref or an extra: the kernel's outputs equal the twin's, NaN for NaN; where the
    ratio is NaN and the objective's term depends on it, the loss is NaN (never a finite clipped value)."""
    n = 1031
    for option, chosen in itertools.product(OBJECTIVE_OPTIONS[objective], [frozenset(), frozenset(EXTRA_FIELDS)]):
        if objective in NEEDS_SEQ_COEF and not chosen:
            chosen = frozenset({"seq_coef"})
        p = params(**{"objective": objective, "kl_coef": 0.05, "kl_estimator": "k3", "entropy_coef": 0.01, **option})
        x, seq = segment_inputs(n)
        e = make_extras(n, chosen, seq)
        nan = float("nan")
        x["logp"][0::17] = nan
        x["old"][5::23] = nan
        x["adv"][7::29] = nan
        x["ref"][9::31] = nan
        for name in chosen:
            getattr(e, name)[11::37] = nan
        x, e = on_device(x, e)
        got = token_terms(*twin_args(x, p), p, backend, e)
        want = token_terms_torch(*twin_args(x, p), p, twin_extras(e, p))
        assert_kernel_equals_twin(got, want, f"{p} with {sorted(chosen)}")
        lr = (x["logp"] - x["old"]) if e.log_ratio is None else e.log_ratio
        assert lr.isnan().any()
        if objective in ("clip", "plain", "cispo", "sapo") and e.pg_weight is None:
            assert got[0][lr.isnan()].isnan().all()


def test_kernel_empty_and_bad_inputs():
    p = params(objective="gmpo")
    empty = torch.empty(0, device=DEVICE)
    got = token_terms(empty, empty, empty, empty, None, None, p, "triton", TokenExtras(seq_coef=empty))
    assert [t.shape for t in got] == [(0,)] * 5 and got[3].dtype == torch.bool
    x = {k: v.to(DEVICE) for k, v in inputs(5).items()}
    with pytest.raises(ValueError, match="seq_coef"):
        token_terms(x["logp"], x["entropy"], x["old"], x["adv"], None, None, p, "triton", TokenExtras())
    with pytest.raises(ValueError, match="eps_high has 1 values"):
        token_terms(x["logp"], x["entropy"], x["old"], x["adv"], None, None, params(), "triton",
                    TokenExtras(eps_high=torch.ones(1, device=DEVICE)))


def test_dispatch_runs_the_kernel_for_extras(monkeypatch):
    """token_terms sends every objective with extras to the Triton kernel (no silent torch fallback)."""
    from erpo.kernels import policy_loss as kernel

    calls = []
    real = kernel.token_terms
    monkeypatch.setattr(kernel, "token_terms", lambda *a, **k: calls.append(1) or real(*a, **k))
    for objective in OBJECTIVE_OPTIONS:
        x, seq = segment_inputs(9)
        x, e = on_device(x, make_extras(9, EXTRA_FIELDS, seq))
        p = params(objective=objective, delta=1.5 if objective == "clip" else None, kl_bias_correction=True)
        token_terms(*twin_args(x, p), p, "triton", e)
    assert len(calls) == len(OBJECTIVE_OPTIONS)
    # float64 stays on the twin (its reference dtype)
    x, seq = segment_inputs(9, torch.float64)
    token_terms(*twin_args(x, params()), params(), "triton", make_extras(9, EXTRA_FIELDS, seq, torch.float64))
    assert len(calls) == len(OBJECTIVE_OPTIONS)


def test_dispatch_sends_extras_to_the_cuda_kernel(monkeypatch):
    """backend='cuda' hands every objective and extras to erpo.ops.cuda_token_loss.token_terms (recorded
    here without the extension; the kernel itself runs in tests/csrc)."""
    from erpo.ops import cuda_token_loss

    seen = []
    monkeypatch.setattr(cuda_token_loss, "token_terms",
                        lambda *a: seen.append((a[6].objective, a[7])) or token_terms_torch(*a))
    for objective in OBJECTIVE_OPTIONS:
        x, seq = segment_inputs(9)
        e = make_extras(9, EXTRA_FIELDS, seq)
        p = params(objective=objective, kl_bias_correction=True)
        token_terms(*twin_args(x, p), p, "cuda", e)
    assert [objective for objective, _ in seen] == list(OBJECTIVE_OPTIONS)
    assert all(extras.pg_weight is not None for _, extras in seen)
