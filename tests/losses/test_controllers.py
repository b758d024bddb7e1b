import math

import pytest

import erpo
from erpo.losses.controls.adapo import AdapoEpsHighController
from erpo.losses.controls.kl_cov import KLCovBetaAnneal
from erpo.losses.controls.repo_r import RepoRZetaController


def test_stateless_methods_have_no_controller():
    for method in ("grpo", "dapo", "dr_grpo", "erpo", "high_entropy_mask", "clip_cov", "kl_cov", "repo"):
        assert erpo.make_controller(erpo.LossConfig(method=method)) is None
    assert isinstance(erpo.make_controller(erpo.LossConfig(method="repo_r")), RepoRZetaController)
    assert isinstance(erpo.make_controller(erpo.LossConfig(method="adapo")), AdapoEpsHighController)
    assert isinstance(erpo.make_controller(erpo.LossConfig(method="kl_cov", kl_cov_anneal="linear")), KLCovBetaAnneal)


def test_repo_r_zeta_doubles_below_target_halves_above_and_is_clipped():
    c = erpo.make_controller(erpo.LossConfig(method="repo_r", zeta=0.01))
    c.step({"entropy": 2.0})  # first step: records the target, changes nothing
    assert (c.target, c.value) == (2.0, 0.01)
    c.step(1.5)
    assert c.value == 0.02
    c.step(1.0)
    c.step(1.0)
    assert c.value == 0.05  # 0.08 clipped to zeta_max
    for _ in range(12):
        c.step(3.0)
    assert c.value == 1e-4  # clipped to zeta_min
    assert c.apply(erpo.LossConfig(method="repo_r")).zeta == 1e-4


def test_negative_zeta_keeps_its_sign():
    c = erpo.make_controller(erpo.LossConfig(method="repo_r", zeta=-0.01, target_entropy=1.0))
    c.step(0.5)
    assert c.value == -0.02


def test_adapo_eps_high_bounds():
    c = erpo.make_controller(erpo.LossConfig(method="adapo", target_entropy=1.0))
    c.step(0.5)
    assert c.value == pytest.approx(0.56)
    c.step(0.5)
    assert c.value == 1.0  # 1.12 clipped to eps_high_max
    c.step(2.0)
    c.step(2.0)
    c.step(2.0)
    assert c.value == 0.2  # clipped to eps_low
    assert c.apply(erpo.LossConfig(method="adapo")).eps_high == 0.2


def test_kl_cov_anneal_schedules():
    lin = erpo.make_controller(erpo.LossConfig(method="kl_cov", kl_cov_anneal="linear", kl_cov_anneal_steps=4, kl_cov_beta=2.0))
    cos = erpo.make_controller(erpo.LossConfig(method="kl_cov", kl_cov_anneal="cosine", kl_cov_anneal_steps=4, kl_cov_beta=2.0))
    values = []
    for _ in range(6):
        values.append((lin.value, cos.value))
        lin.step()
        cos.step()
    assert [v[0] for v in values] == [2.0, 1.5, 1.0, 0.5, 0.0, 0.0]
    assert [v[1] for v in values] == pytest.approx([2.0, 1 + math.cos(math.pi / 4), 1.0, 1 - math.cos(math.pi / 4), 0.0, 0.0])
    assert lin.apply(erpo.LossConfig(method="kl_cov")).kl_cov_beta == 0.0


def test_state_dict_roundtrip_and_mismatch():
    c = erpo.make_controller(erpo.LossConfig(method="adapo"))
    c.step(1.0)
    c.step(0.5)
    fresh = erpo.make_controller(erpo.LossConfig(method="adapo"))
    fresh.load_state_dict(c.state_dict())
    assert (fresh.value, fresh.target, fresh.steps) == (c.value, c.target, c.steps)
    with pytest.raises(ValueError, match="eps_high"):
        erpo.make_controller(erpo.LossConfig(method="repo_r")).load_state_dict(c.state_dict())


def test_non_finite_entropy_is_reported():
    c = erpo.make_controller(erpo.LossConfig(method="repo_r"))
    with pytest.raises(ValueError, match="non-finite"):
        c.step(float("nan"))
