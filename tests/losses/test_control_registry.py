"""Adding a control is one declaration: a toy control registered here (not shipped) runs end to end through
LossConfig's checks, policy_loss, token_policy_loss, the one-pass choice and the dense float64 reference
(erpo/losses/naive.py), with no other file edited. And the registry keeps LossConfig torch-free."""
import subprocess
import sys

import pytest
import torch

import erpo
from erpo.losses import controls
from erpo.losses.linear_policy_loss import one_pass_exact
from erpo.losses.naive import naive_policy_loss
from erpo.losses.shaping import Shaping
from tests.losses.test_composition import make, run


def _halve(config, tokens, shaping, generator):
    """Halve the advantage of the tokens whose entropy is above the batch's mean."""
    mean = torch.where(tokens.valid, tokens.entropy, 0.0).sum() / tokens.n_valid
    above = tokens.valid & (tokens.entropy > mean)
    return Shaping(adv=torch.where(above, shaping.adv / 2, shaping.adv), masked=above,
                   metrics={"toy_frac": above.sum() / tokens.n_valid})


def _halve_dense(config, d):
    above = d.mask & (d.H > d.H[d.mask].mean())
    d.a = torch.where(above, d.a / 2, d.a)
    d.masked = d.masked | above


@pytest.fixture
def toy():
    controls.register(controls.Control(name="toy_halve", order=45, reads_entropy=True, apply=_halve,
                                       naive=_halve_dense))
    yield
    controls.REGISTRY.pop("toy_halve")


def test_a_toy_control_runs_end_to_end_from_its_declaration(toy):
    config = erpo.LossConfig(method="dapo", controls=("toy_halve", "high_entropy_mask"), rho=0.6, backend="torch")
    assert config.needs_entropy and "toy_halve" in config.entropy_reason() and not one_pass_exact(config)
    logits, batch = make()
    got, g_got = run(logits, batch, config)
    want, g_want = run(logits, batch, config, naive_policy_loss)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(g_got, g_want, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(got.metrics["masked_frac"].double(), want.metrics["masked_frac"].double())
    assert got.metrics["toy_frac"] > 0
    without, g_without = run(logits, batch, config.replace(controls=("high_entropy_mask",)))
    assert (g_got - g_without).abs().max() > 1e-6 * g_without.abs().max()  # it acts
    logp, entropy = erpo.logprobs_and_entropy(logits, batch["targets"].clamp_min(0), backend="torch")
    token = erpo.token_policy_loss(logp, entropy, batch, config)
    torch.testing.assert_close(token.loss, got.loss, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="toy_halve"):  # it shapes token advantages: not on GMPO's sequence product
        erpo.LossConfig(method="gmpo", controls=("toy_halve",))


def test_an_unregistered_control_is_refused():
    with pytest.raises(ValueError, match="toy_halve"):
        erpo.LossConfig(method="dapo", controls=("toy_halve",))


def test_config_and_registry_import_and_validate_without_torch():
    probe = ("import sys; from erpo.losses.config import LossConfig, CONTROLS; from erpo.losses import controls\n"
             "LossConfig(method='erpo', controls=('erpo', 'kl_cov'), eta=0.1); LossConfig(method='repo_r')\n"
             "print('torch' in sys.modules, CONTROLS == controls.names())")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["False", "True"], out.stderr
