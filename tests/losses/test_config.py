import pytest

import erpo
from erpo.losses.config import METHODS


def test_method_defaults_from_the_spec():
    grpo = erpo.LossConfig(method="grpo")
    assert (grpo.eps_low, grpo.eps_high, grpo.agg, grpo.kl_coef, grpo.kl_estimator) == (
        0.2, 0.2, "seq-mean-token-mean", 0.04, "k3")
    dapo = erpo.LossConfig(method="dapo")
    assert (dapo.eps_low, dapo.eps_high, dapo.agg, dapo.kl_coef) == (0.2, 0.28, "token-mean", 0.0)
    dr = erpo.LossConfig(method="dr_grpo")
    assert (dr.adv_estimator, dr.eps_high, dr.agg) == ("dr_grpo", 0.2, "seq-mean-token-sum-norm")
    e = erpo.LossConfig(method="erpo")
    assert (e.gamma, e.gate, e.gate_lambda, e.beta_p, e.buckets, e.eta, e.eps_low, e.eps_high, e.agg) == (
        5.0, "redistribute", 1.0, 0.1, 8, 0.2, 0.2, 0.28, "token-mean")
    assert erpo.LossConfig(method="high_entropy_mask").rho == 0.2
    cc = erpo.LossConfig(method="clip_cov")
    assert (cc.clip_cov_ratio, cc.clip_cov_lb, cc.clip_cov_ub, cc.agg) == (2e-4, 1.0, 5.0, "token-mean")
    kc = erpo.LossConfig(method="kl_cov")
    assert (kc.kl_cov_ratio, kc.kl_cov_beta, kc.agg) == (2e-3, 1.0, "token-mean")
    rr = erpo.LossConfig(method="repo_r")
    assert (rr.zeta_min, rr.zeta_max) == (1e-4, 0.05)
    assert erpo.LossConfig(method="adapo").eps_high_max == 1.0
    assert all(erpo.LossConfig(method=m).temperature == 1.0 for m in METHODS)


def test_explicit_knobs_override_method_defaults():
    c = erpo.LossConfig(method="grpo", kl_coef=0.0, eps_high=0.3, agg="token-mean", temperature=0.7)
    assert (c.kl_coef, c.eps_high, c.agg, c.temperature) == (0.0, 0.3, "token-mean", 0.7)
    assert erpo.LossConfig(method="erpo", eta=0).eta == 0.0
    assert c.replace(eps_low=0.1).eps_low == 0.1


@pytest.mark.parametrize("knobs, match", [
    (dict(method="ppo"), "method"),
    (dict(agg="token-sum"), "agg"),
    (dict(adv_estimator="gae"), "adv_estimator"),
    (dict(kl_estimator="k4"), "kl_estimator"),
    (dict(gate="soft"), "gate"),
    (dict(backend="numpy"), "backend"),
    (dict(kl_cov_anneal="step"), "kl_cov_anneal"),
    (dict(eps_low=-0.1), "eps_low"),
    (dict(eps_low=1.0), "eps_low"),
    (dict(eps_high=-0.01), "eps_high"),
    (dict(gamma=0.0), "gamma"),
    (dict(gamma=-1.0), "gamma"),
    (dict(buckets=0), "buckets"),
    (dict(rho=-0.1), "rho"),
    (dict(rho=1.5), "rho"),
    (dict(clip_cov_ratio=0.0), "clip_cov_ratio"),
    (dict(kl_cov_ratio=2.0), "kl_cov_ratio"),
    (dict(clip_cov_lb=5.0, clip_cov_ub=1.0), "clip_cov_lb"),
    (dict(kl_coef=-0.1), "kl_coef"),
    (dict(temperature=0.0), "temperature"),
    (dict(dual_clip_c=1.0), "dual_clip_c"),
    (dict(zeta=0.1), "zeta"),
    (dict(zeta_min=0.0), "zeta_min"),
    (dict(method="adapo", eps_high=0.1), "ADAPO"),
    (dict(eps_high_max=0.1), "eps_high_max"),
    (dict(target_entropy=-1.0), "target_entropy"),
    (dict(eta=float("nan")), "eta"),
    (dict(kl_cov_anneal_steps=0), "kl_cov_anneal_steps"),
    (dict(max_len=0), "max_len"),
])
def test_bad_config_raises_value_error_naming_the_knob(knobs, match):
    with pytest.raises(ValueError, match=match):
        erpo.LossConfig(**knobs)


@pytest.mark.parametrize("knobs", [dict(buckets=2.5), dict(gamma="5"), dict(dual_clip=1), dict(seed=1.0)])
def test_wrong_knob_types_raise_type_error(knobs):
    with pytest.raises(TypeError):
        erpo.LossConfig(**knobs)


def test_unknown_knob_raises():
    with pytest.raises(TypeError, match="epsilon"):
        erpo.LossConfig(epsilon=0.2)
