"""verl 0.9.1: erpo's losses in verl's registry (erpo.integrations.verl), and parity of erpo.token_policy_loss with
verl's own policy losses (`core_algos.get_policy_loss_fn(mode)`) and rollout-correction weights on identical inputs:
loss and gradient w.r.t. log_prob, fp32, 1e-5 relative."""
import pytest
import torch

from erpo.losses.config import METHODS
from tests.peers.inputs import assert_close, loss_floor, token_inputs

AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


@pytest.fixture(scope="module")
def verl_erpo(verl_core):
    import erpo.integrations.verl as integration

    return integration


def actor_config(agg="token-mean", low=0.15, high=0.25, **policy):
    from verl.workers.config import ActorConfig, PolicyLossConfig

    return ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio_low=low,
                       clip_ratio_high=high, loss_agg_mode=agg, tau_pos=0.8, tau_neg=1.3,
                       policy_loss=PolicyLossConfig(**policy))


def run_verl(core, mode, x, config, rollout_is_weights=None):
    log_prob = x.logp.detach().clone().requires_grad_(True)
    advantages = x.advantages[:, None].expand_as(x.mask).contiguous()  # verl's token-level layout
    loss, _ = core.get_policy_loss_fn(mode)(
        old_log_prob=x.old, log_prob=log_prob, advantages=advantages, response_mask=x.mask.bool(),
        loss_agg_mode=config.loss_agg_mode, config=config, rollout_is_weights=rollout_is_weights)
    loss.backward()
    return loss, log_prob.grad


def run_erpo(x, loss_config, entropy=None, **extra):
    import erpo

    logp = x.logp.detach().clone().requires_grad_(True)
    batch = {"mask": x.mask, "old_logp": x.old, "advantages": x.advantages, **extra}
    result = erpo.token_policy_loss(logp, entropy, batch, loss_config)
    result.loss.backward()
    return result.loss, logp.grad


def _erpo_config(**fields):
    from erpo import LossConfig

    return LossConfig(**fields)


# verl mode -> the erpo LossConfig fields with the same formula (clip range 0.15 / 0.25 from actor_config)
PARITY = {
    "vanilla": dict(method="dapo", eps_low=0.15, eps_high=0.25, dual_clip=True, dual_clip_c=3.0),  # verl: always dual-clip
    "gspo": dict(method="gspo", eps_low=0.15, eps_high=0.25),
    "gpg": dict(method="gpg"),
    "cispo": dict(method="cispo", cispo_clip="two_sided", eps_low=0.15, eps_high=0.25),
    "kl_cov": dict(method="kl_cov", kl_cov_ratio=0.2, kl_cov_beta=0.7),
}


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("mode", sorted(PARITY))
def test_policy_loss_matches_verl(verl_core, mode, agg):
    x = token_inputs(spread=0.3)
    config = actor_config(agg, kl_cov_ratio=0.2, ppo_kl_coef=0.7)
    expected, expected_grad = run_verl(verl_core, mode, x, config)
    loss, grad = run_erpo(x, _erpo_config(**PARITY[mode], agg=agg, max_len=x.mask.shape[1]))
    assert_close(loss, expected, f"{mode} {agg} loss", floor=loss_floor(x.advantages))
    assert_close(grad, expected_grad, f"{mode} {agg} d loss / d log_prob")


def test_sapo_matches_verl(verl_core):
    """verl's SAPO always aggregates seq-mean-token-mean (its loss_agg_mode is ignored), as erpo's sapo preset."""
    x = token_inputs()
    expected, expected_grad = run_verl(verl_core, "sapo", x, actor_config("seq-mean-token-mean"))
    loss, grad = run_erpo(x, _erpo_config(method="sapo", sapo_tau_pos=0.8, sapo_tau_neg=1.3))
    assert_close(loss, expected, "sapo loss", floor=loss_floor(x.advantages))
    assert_close(grad, expected_grad, "sapo d loss / d log_prob")


def test_gmpo_matches_verl_geo_mean(verl_core):
    x = token_inputs()
    expected, expected_grad = run_verl(verl_core, "geo_mean", x, actor_config("seq-mean-token-mean", 0.3, 0.35))
    loss, grad = run_erpo(x, _erpo_config(method="gmpo", eps_low=0.3, eps_high=0.35))
    assert_close(loss, expected, "gmpo loss", floor=loss_floor(x.advantages))
    assert_close(grad, expected_grad, "gmpo d loss / d log_prob")


def test_clip_cov_matches_verl_when_every_candidate_is_picked(verl_core):
    """verl picks its Clip-Cov tokens with torch.randperm, erpo with its own generator: the picks agree when the
    pick count (clip_cov_ratio * N) covers every candidate, so that is the case compared."""
    x = token_inputs(batch=6, length=9)
    config = actor_config(clip_cov_ratio=1.0, clip_cov_lb=0.02, clip_cov_ub=5.0)
    expected, expected_grad = run_verl(verl_core, "clip_cov", x, config)
    loss, grad = run_erpo(x, _erpo_config(method="clip_cov", eps_low=0.15, eps_high=0.25, clip_cov_ratio=1.0,
                                          clip_cov_lb=0.02, clip_cov_ub=5.0), entropy=x.entropy.detach())
    assert_close(loss, expected, "clip_cov loss", floor=loss_floor(x.advantages))
    assert_close(grad, expected_grad, "clip_cov d loss / d log_prob")
    assert (grad[x.mask.bool()] == 0).any() and (grad[x.mask.bool()] != 0).any()


@pytest.mark.parametrize("level,threshold,erpo_mode,low,high", [
    ("token", "2.0", "token_truncate", None, 2.0),
    ("sequence", "1.5", "sequence_truncate", None, 1.5),
    ("token", "0.8_1.3", "token_mask", 0.8, 1.3),
    ("sequence", "0.5_2.0", "sequence_mask", 0.5, 2.0),
])
def test_rollout_correction_matches_verl(verl_core, level, threshold, erpo_mode, low, high):
    """verl's rollout correction (TIS / IcePop weights from rollout_corr_helper, applied by its vanilla loss) ==
    erpo's rollout_is from the same rollout log-probs."""
    from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_weights

    x = token_inputs(spread=0.2)
    weights, _ = compute_rollout_correction_weights(x.old - x.rollout, x.mask, level, threshold)
    expected, expected_grad = run_verl(verl_core, "vanilla", x, actor_config(), rollout_is_weights=weights)
    loss, grad = run_erpo(x, _erpo_config(**PARITY["vanilla"], rollout_is=erpo_mode, rollout_is_min=low,
                                          rollout_is_max=high), rollout_logp=x.rollout)
    assert_close(loss, expected, f"{erpo_mode} loss", floor=loss_floor(x.advantages))
    assert_close(grad, expected_grad, f"{erpo_mode} d loss / d log_prob")


def test_every_preset_is_registered(verl_core, verl_erpo):
    from erpo.losses.config import METHODS

    for name in [f"erpo_{m}" for m in METHODS] + ["erpo"]:
        assert callable(verl_core.get_policy_loss_fn(name)), name


@pytest.mark.parametrize("preset", ["dapo", "grpo", "gspo", "cispo", "kl_cov", "gpg"])
def test_registered_loss_equals_token_policy_loss(verl_core, verl_erpo, preset):
    """A call with verl's exact arguments == erpo.token_policy_loss on the same inputs and LossConfig."""
    x = token_inputs()
    config = actor_config("seq-mean-token-mean")
    expected, expected_grad = run_erpo(x, verl_erpo.loss_config_from_verl(config, preset).replace(
        agg="seq-mean-token-mean"))
    loss, grad = run_verl(verl_core, f"erpo_{preset}", x, config)
    assert_close(loss, expected, f"erpo_{preset} loss", floor=loss_floor(x.advantages))
    assert_close(grad, expected_grad, f"erpo_{preset} d loss / d log_prob")


def test_loss_config_from_verl_maps_the_actor_keys(verl_erpo):
    config = actor_config("seq-mean-token-sum", 0.1, 0.3, clip_cov_ratio=0.01, kl_cov_ratio=0.05, ppo_kl_coef=0.4)
    loss_config = verl_erpo.loss_config_from_verl(config, "kl_cov")
    assert (loss_config.eps_low, loss_config.eps_high, loss_config.agg) == (0.1, 0.3, "seq-mean-token-sum")
    assert (loss_config.kl_cov_ratio, loss_config.kl_cov_beta, loss_config.clip_cov_ratio) == (0.05, 0.4, 0.01)
    assert (loss_config.sapo_tau_pos, loss_config.sapo_tau_neg) == (0.8, 1.3)


def test_erpo_mode_reads_loss_config_from_policy_loss(verl_core, verl_erpo):
    from verl.utils.config import omega_conf_to_dataclass

    from verl.workers.config import ActorConfig  # noqa: F401  (the _target_ below)

    raw = {"_target_": "verl.workers.config.ActorConfig", "strategy": "fsdp", "rollout_n": 1,
           "ppo_micro_batch_size_per_gpu": 1, "loss_agg_mode": "token-mean",
           "policy_loss": {"_target_": "erpo.integrations.verl.PolicyLossConfig", "loss_mode": "erpo",
                           "erpo": {"method": "dapo", "controls": "high_entropy_mask", "rho": 0.5}}}
    config = omega_conf_to_dataclass(raw)
    loss_config = verl_erpo.loss_config_from_verl(config, None)
    assert loss_config.controls == ("high_entropy_mask",) and loss_config.rho == 0.5
    x = token_inputs()
    expected, expected_grad = run_erpo(x, loss_config, entropy=x.entropy.detach())
    with verl_erpo.per_token_entropy(x.entropy.detach()):
        loss, grad = run_verl(verl_core, "erpo", x, config)
    assert_close(loss, expected, "erpo loss", floor=loss_floor(x.advantages))
    assert_close(grad, expected_grad, "erpo d loss / d log_prob")


def test_entropy_control_without_entropy_raises(verl_core, verl_erpo):
    x = token_inputs()
    with pytest.raises(ValueError, match="calculate_entropy=True"):
        run_verl(verl_core, "erpo_high_entropy_mask", x, actor_config())


def test_rollout_is_weights_from_verl_raise(verl_core, verl_erpo):
    x = token_inputs()
    with pytest.raises(ValueError, match="rollout_correction.rollout_is"):
        run_verl(verl_core, "erpo_dapo", x, actor_config(), rollout_is_weights=torch.ones_like(x.mask))


def test_token_level_advantages_raise(verl_core, verl_erpo):
    x = token_inputs()
    log_prob = x.logp.detach().clone().requires_grad_(True)
    with pytest.raises(ValueError, match="vary within a response"):
        verl_core.get_policy_loss_fn("erpo_dapo")(x.old, log_prob, torch.randn_like(x.mask), x.mask.bool(),
                                                 "token-mean", actor_config())


def test_rollout_correction_through_the_registered_loss_matches_verl(verl_core, verl_erpo):
    """erpo's rollout_is from the rollout log-probs handed over by the hook == verl's TIS weights + vanilla loss."""
    from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_weights

    x = token_inputs(spread=0.2)
    weights, _ = compute_rollout_correction_weights(x.old - x.rollout, x.mask, "token", "1.5")
    expected, expected_grad = run_verl(verl_core, "vanilla", x, actor_config(), rollout_is_weights=weights)
    raw = {"_target_": "verl.workers.config.ActorConfig", "strategy": "fsdp", "rollout_n": 1,
           "ppo_micro_batch_size_per_gpu": 1, "clip_ratio_low": 0.15, "clip_ratio_high": 0.25,
           "policy_loss": {"_target_": "erpo.integrations.verl.PolicyLossConfig", "loss_mode": "erpo_dapo",
                           "erpo": {"dual_clip": True, "rollout_is": "token_truncate", "rollout_is_max": 1.5}}}
    from verl.utils.config import omega_conf_to_dataclass

    config = omega_conf_to_dataclass(raw)
    with pytest.raises(ValueError, match="calculate_log_probs=True"):
        run_verl(verl_core, "erpo_dapo", x, config)
    with verl_erpo.per_token_entropy(None, x.rollout):
        loss, grad = run_verl(verl_core, "erpo_dapo", x, config)
    assert_close(loss, expected, "loss", floor=loss_floor(x.advantages))
    assert_close(grad, expected_grad, "d loss / d log_prob")


def test_ppo_loss_hook_hands_verl_entropy_to_erpo(verl_core, verl_erpo, monkeypatch):
    """The hook on verl's ppo_loss is installed where verl defines it, and hands model_output["entropy"] (after
    verl's no-padding -> padded conversion) to the registered loss: the entropy-masked loss equals erpo's."""
    import verl.workers.utils.losses as verl_losses

    assert getattr(verl_losses.ppo_loss, "__erpo_entropy_hook__", False), "verl's ppo_loss is not hooked"
    monkeypatch.setattr(verl_losses, "no_padding_2_padding", lambda tensor, data: tensor)
    x = token_inputs()
    config = actor_config()

    def fake_ppo_loss(config, model_output, data):  # stands for verl's body: it calls the registered loss
        return run_verl(verl_core, "erpo_high_entropy_mask", x, config)

    from tensordict import TensorDict

    data = TensorDict({"response_mask": x.mask}, batch_size=[x.mask.shape[0]])  # no rollout log-probs in it
    loss, grad = verl_erpo._with_entropy(fake_ppo_loss)(config, {"entropy": x.entropy.detach()}, data)
    expected, expected_grad = run_erpo(x, verl_erpo.loss_config_from_verl(config, "high_entropy_mask"),
                                       entropy=x.entropy.detach())
    assert_close(loss, expected, "hooked loss", floor=loss_floor(x.advantages))
    assert_close(grad, expected_grad, "hooked d loss / d log_prob")


def test_gspo_sequence_log_ratio_cap_differs_from_verl(verl_core):
    """Deliberate difference (docs/losses.md, "Parity with the peers"): verl clamps GSPO's sequence log-ratio at 10
    (value capped, gradient stopped), erpo does not clamp a ratio (its clip range does that where it applies). They
    differ only on a response whose mean log-ratio exceeds 10 with a negative advantage (the unclipped side)."""
    x = token_inputs()
    x.old = x.old.clone()
    x.old[1] = x.logp.detach()[1] - 12.0  # response 1: log s = 12
    x.advantages[1] = -1.0
    config = actor_config()
    expected, expected_grad = run_verl(verl_core, "gspo", x, config)
    loss, grad = run_erpo(x, _erpo_config(method="gspo", eps_low=0.15, eps_high=0.25, agg="token-mean"))
    row = x.mask[1].bool()
    assert (expected_grad[1][row] == 0).all(), "verl's clamp (max=10) stops the gradient of that response"
    assert (grad[1][row] != 0).all(), "erpo keeps it: -a s_i per token"
    assert loss > expected, "the unclipped -a s_i term with s_i = e^12 > e^10"
    others = torch.ones_like(x.mask, dtype=torch.bool)
    others[1] = False
    assert_close(grad[others], expected_grad[others], "gspo gradient on the other responses")


@pytest.mark.parametrize("agg", [*AGGS, "token-sum"])
def test_global_batch_info_normalises_like_verl(verl_core, verl_erpo, agg):
    """verl's global_batch_info (dp_size, batch_num_tokens, global_batch_size, loss_scale_factor) becomes erpo's
    global normalisers: erpo_gpg equals verl's gpg under data parallelism's scaling."""
    x = token_inputs()
    config = actor_config(agg)
    config.global_batch_info.update(dp_size=2, batch_num_tokens=int(x.mask.sum()) * 3, global_batch_size=x.mask.shape[0] * 3,
                                    loss_scale_factor=11)
    expected, expected_grad = run_verl(verl_core, "gpg", x, config)
    loss, grad = run_verl(verl_core, "erpo_gpg", x, config)
    assert_close(loss, expected, f"{agg} loss", floor=loss_floor(x.advantages))
    assert_close(grad, expected_grad, f"{agg} d loss / d log_prob")


@pytest.mark.parametrize("layout", ["padded", "jagged"])
def test_ppo_loss_hook_hands_rollout_log_probs_from_verl_batch(verl_core, verl_erpo, layout):
    """The hook pads the batch's rollout_log_probs as verl's ppo_loss pads old_log_probs (padded [B, T] in verl
    0.9.1's batch, or jagged) and hands them over."""
    from tensordict import TensorDict

    x = token_inputs()
    lengths = x.mask.sum(-1).long().tolist()
    rollout = x.rollout if layout == "padded" else torch.nested.nested_tensor(
        [x.rollout[i, :n] for i, n in enumerate(lengths)], layout=torch.jagged)
    data = TensorDict({"rollout_log_probs": rollout}, batch_size=[len(lengths)])
    handed = []

    def fake_ppo_loss(config, model_output, data):
        handed.append(verl_erpo._ROLLOUT.get())

    verl_erpo._with_entropy(fake_ppo_loss)(actor_config(), {}, data)
    assert_close(handed[0] * x.mask, x.rollout * x.mask, "rollout log-probs handed to erpo")


@pytest.mark.parametrize("preset", ["repo_r", "adapo"])
def test_stateful_controls_raise_under_verl(verl_core, verl_erpo, preset):
    """A control whose state steps once per optimizer step would silently stay at its initial value in verl's
    stateless registry: it raises instead."""
    x = token_inputs()
    with verl_erpo.per_token_entropy(x.entropy.detach()):
        with pytest.raises(ValueError, match="cannot drive"):
            run_verl(verl_core, f"erpo_{preset}", x, actor_config())


@pytest.mark.parametrize("mode", sorted(PARITY))
@pytest.mark.parametrize("dp_size", [1, 2])
def test_token_sum_matches_verl(verl_core, verl_erpo, mode, dp_size):
    """verl's loss_agg_mode="token-sum" (sum over the valid tokens x dp_size) through the registered loss == verl's own
    loss of the same formula: erpo's token-mean over num_items_in_batch = 1 / dp_size."""
    from verl.utils.config import omega_conf_to_dataclass

    x = token_inputs()
    overrides = {k: v for k, v in PARITY[mode].items() if k not in ("method", "eps_low", "eps_high")}
    overrides.pop("kl_cov_ratio", None), overrides.pop("kl_cov_beta", None)
    raw = {"_target_": "verl.workers.config.ActorConfig", "strategy": "fsdp", "rollout_n": 1,
           "ppo_micro_batch_size_per_gpu": 1, "clip_ratio_low": 0.15, "clip_ratio_high": 0.25,
           "loss_agg_mode": "token-sum",
           "policy_loss": {"_target_": "erpo.integrations.verl.PolicyLossConfig", "loss_mode": f"erpo_{mode}",
                           "kl_cov_ratio": 0.2, "ppo_kl_coef": 0.7, "erpo": overrides}}
    config = omega_conf_to_dataclass(raw)
    config.global_batch_info.update(dp_size=dp_size, batch_num_tokens=int(x.mask.sum()) * 3)
    expected, expected_grad = run_verl(verl_core, mode, x, config)
    loss, grad = run_verl(verl_core, f"erpo_{PARITY[mode]['method']}", x, config)
    assert_close(loss, expected, f"{mode} token-sum loss", floor=loss_floor(x.advantages) * x.mask.sum().item())
    assert_close(grad, expected_grad, f"{mode} token-sum d loss / d log_prob")


@pytest.mark.parametrize("preset", [m for m in METHODS if m not in ("repo_r", "adapo", "erpo")])  # those: refused
def test_every_preset_takes_token_sum(verl_core, verl_erpo, preset):
    """No erpo_<preset> raises under token-sum, and each gives verl's token-sum of its own per-token terms:
    token-sum with dp_size 2 == 2 x N_valid x the local token-mean."""
    x = token_inputs()
    losses = []
    for agg, dp_size in (("token-mean", 1), ("token-sum", 2)):
        config = actor_config(agg, kl_cov_ratio=0.2)
        config.global_batch_info.update(dp_size=dp_size)
        if agg == "token-mean":
            config.global_batch_info.update(batch_num_tokens=int(x.mask.sum()) * dp_size)
        with verl_erpo.per_token_entropy(x.entropy.detach()):
            losses.append(run_verl(verl_core, f"erpo_{preset}", x, config))
    (mean_loss, mean_grad), (sum_loss, sum_grad) = losses
    n_valid = x.mask.sum()
    assert_close(sum_loss, 2 * n_valid * mean_loss, f"{preset} token-sum loss",
                 floor=loss_floor(x.advantages) * n_valid.item())
    assert_close(sum_grad, 2 * n_valid * mean_grad, f"{preset} token-sum d loss / d log_prob")


def test_k3_kl_clamp_differs_from_verl(verl_core):
    """Deliberate difference (docs/losses.md, "Parity with the peers"): verl's k3 / low_var_kl penalty clamps
    ref - logp to [-20, 20] and the estimate to [-10, 10] (value capped, gradient stopped); erpo's kl_coef term (k3)
    clamps nothing, as TRL's. They differ only on a token whose k3 exceeds 10, by exactly the capped excess."""
    import erpo

    x = token_inputs(dtype=torch.float64)  # the KL term as a difference of two losses: fp64 keeps it exact
    x.logp.data[1, 0], x.ref[1, 0] = -3.5, -0.01  # k3 = e^3.49 - 3.49 - 1 ~ 28 > 10
    n_valid = x.mask.sum()
    logp = x.logp.detach().clone().requires_grad_(True)
    verl_kl = verl_core.agg_loss(verl_core.kl_penalty(logp, x.ref, "low_var_kl"), x.mask, "token-mean")
    verl_kl.backward()
    terms = []
    for kl_coef in (0.1, 0.0):
        config = _erpo_config(method="dapo", kl_coef=kl_coef, kl_estimator="k3")
        terms.append(run_erpo(x, config, ref_logp=x.ref))
    erpo_kl, erpo_grad = (terms[0][0] - terms[1][0]) / 0.1, (terms[0][1] - terms[1][1]) / 0.1
    k3 = torch.exp(x.ref[1, 0] - x.logp[1, 0]) - (x.ref[1, 0] - x.logp[1, 0]) - 1
    assert k3 > 10
    assert_close(erpo_kl - verl_kl, (k3 - 10) / n_valid, "erpo's KL - verl's KL: the capped excess of one token")
    assert logp.grad[1, 0] == 0, "verl's clamp stops that token's gradient"
    assert_close(erpo_grad[1, 0], (1 - torch.exp(x.ref[1, 0] - x.logp[1, 0])) / n_valid, "erpo keeps it")
    others = torch.ones_like(x.mask, dtype=torch.bool)
    others[1, 0] = False
    assert_close(erpo_grad[others], logp.grad[others], "KL gradient on the other tokens")
