"""The composable LossConfig: objectives x importance level x controls x corrections, each against the dense
float64 reference (erpo.losses.naive), each mechanism shown to act, token_policy_loss equal to policy_loss,
micro-batches with global normalizers equal to one big batch, and every bad combination refused."""
import math

import pytest
import torch

import erpo
from erpo.losses import controllers as controllers_lib
from erpo.losses.config import CONTROLS, METHODS, OBJECTIVES
from erpo.losses.naive import naive_policy_loss
from tests.losses.conftest import random_batch

B, L, V = 6, 7, 13


def make(spread=0.6, **kwargs):
    """float64 logits and a batch whose old/rollout log-probs sit far enough from the policy that clips bind."""
    logits, batch = random_batch(B=B, L=L, V=V, dtype=torch.float64, rewards=False, empty_rows=(4,), **kwargs)
    logp = torch.log_softmax(logits, -1).gather(-1, batch["targets"][..., None])[..., 0].float()
    batch["old_logp"] = (logp + spread * torch.randn(B, L)).clamp(max=0.0)
    batch["rollout_logp"] = (batch["old_logp"] + 0.4 * torch.randn(B, L)).clamp(max=0.0)
    return logits, batch


def run(logits, batch, config, fn=erpo.policy_loss):
    leaf = logits.detach().clone().requires_grad_()
    result = fn(leaf, batch, config)
    result.loss.backward()
    return result, leaf.grad


COMPOSED = [
    dict(method="dapo", objective="cispo", controls="high_entropy_mask,kl_cov"),
    dict(method="dapo", objective="cispo", cispo_clip="two_sided", controls=("clip_cov",), clip_cov_ratio=0.2,
         clip_cov_lb=-10.0, clip_cov_ub=10.0),
    dict(method="dapo", objective="sapo", controls=("entropy_advantage", "repo")),
    dict(method="dapo", objective="vespo", controls=("erpo",), eta=0.2, rollout_is="token_mask", rollout_is_min=0.5,
         rollout_is_max=2.0),
    dict(method="dapo", objective="gpg", controls=("repo_r", "high_entropy_mask"), agg="seq-mean-token-sum"),
    dict(method="dapo", objective="gmpo", controls=("kl_cov",), rollout_is="token_truncate", rollout_is_max=1.5),
    dict(method="gspo", controls=("high_entropy_mask", "kl_cov"), rho=0.5),
    dict(method="gspo", eps_low=0.1, eps_high=0.1, controls=("erpo",), eta=0.0, rollout_is="sequence_truncate",
         rollout_is_min=0.2, rollout_is_max=5.0),
    dict(method="luspo", objective="cispo", rollout_is="sequence_mask", rollout_is_max=3.0),
    dict(method="dapo", controls=("archer", "clip_cov"), kl_coef=0.05, clip_cov_ratio=0.2, clip_cov_lb=-10.0,
         clip_cov_ub=10.0),
    dict(method="dapo", controls=("archer", "high_entropy_mask", "entropy_advantage"), kl_coef=0.05,
         kl_bias_correction=True),
    dict(method="grpo", delta=1.4, dual_clip=True, kl_bias_correction=True, off_policy_mask=0.01),
    dict(method="dr_grpo", controls=("erpo", "kl_cov", "high_entropy_mask"), eta=0.1, max_len=9),
    dict(method="dapo", controls=("adapo", "clip_cov"), clip_cov_lb=-10.0, clip_cov_ub=10.0,
         entropy_coef=0.01, entropy_target=0.5),
    dict(method="dapo", objective="plain", controls=("high_entropy_mask", "kl_cov"), entropy_coef=0.01),
]


@pytest.mark.parametrize("knobs", [dict(method=m) for m in METHODS] + COMPOSED,
                         ids=lambda k: "-".join(str(v) for v in k.values()))
def test_matches_the_dense_float64_reference(knobs):
    logits, batch = make()
    batch["num_items_in_batch"] = 50.0
    batch["num_seqs_in_batch"] = torch.tensor(9.0)
    config = erpo.LossConfig(backend="torch", **knobs)
    if config.is_level == "sequence" and config.eps_low < 0.01:
        # the GSPO paper's 3e-4 would clip every response of this batch (zero gradient): the same code, a wider range
        config = config.replace(eps_low=0.2, eps_high=0.28)
    got, g_got = run(logits, batch, config)
    want, g_want = run(logits, batch, config, naive_policy_loss)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(g_got, g_want, rtol=1e-8, atol=1e-12)
    assert g_got.abs().sum() > 0
    for name in ("clip_frac_low", "clip_frac_high", "masked_frac", "entropy", "ratio_mean"):
        torch.testing.assert_close(got.metrics[name].double(), want.metrics[name].double(), rtol=1e-9, atol=1e-12)


# Each knob, set alone on top of DAPO: (changes, metric that must show it acting, or None).
MECHANISMS = [
    (dict(objective=o), None) for o in OBJECTIVES if o != "clip"
] + [
    (dict(is_level="sequence"), "seq_ratio_mean"),
    (dict(controls=("high_entropy_mask",)), "entropy_mask_frac"),
    (dict(controls=("erpo",), eta=0.2), "cdp_rate"),
    (dict(controls=("clip_cov",), clip_cov_ratio=0.3, clip_cov_lb=-10.0, clip_cov_ub=10.0), "clip_cov_frac"),
    (dict(controls=("kl_cov",), kl_cov_ratio=0.2), "kl_cov_frac"),
    (dict(controls=("repo",)), None),
    (dict(controls=("repo_r",), zeta=0.05), None),
    (dict(controls=("entropy_advantage",)), "entropy_adv_bonus"),
    (dict(controls=("archer",), kl_coef=0.1), "archer_high_frac"),
    (dict(delta=1.3), None),
    (dict(kl_coef=0.1, kl_bias_correction=True), None),
    (dict(off_policy_mask=0.01), "off_policy_masked_frac"),
    (dict(rollout_is="token_truncate", rollout_is_min=0.8, rollout_is_max=1.2), "rollout_is_truncated_frac"),
    (dict(rollout_is="token_mask", rollout_is_min=0.8, rollout_is_max=1.2), "rollout_is_masked_frac"),
    (dict(rollout_is="sequence_truncate", rollout_is_min=0.9, rollout_is_max=1.1), "rollout_is_truncated_frac"),
    (dict(rollout_is="sequence_mask", rollout_is_min=0.9, rollout_is_max=1.1), "rollout_is_masked_frac"),
]


@pytest.mark.parametrize("knobs,metric", MECHANISMS, ids=lambda k: "-".join(str(v) for v in k.values())
                         if isinstance(k, dict) else str(k))
def test_each_mechanism_acts(knobs, metric):
    """A knob that silently did nothing would leave loss and gradient exactly DAPO's."""
    logits, batch = make(spread=0.4)  # ratios both inside and outside the clip range
    if "off_policy_mask" in knobs:  # the engine's log-probs well above the policy's: the a < 0 responses go
        logp = torch.log_softmax(logits, -1).gather(-1, batch["targets"][..., None])[..., 0].float()
        batch["rollout_logp"] = (logp + 0.3).clamp(max=0.0)
        batch["advantages"][0] = -1.0
    if "delta" in knobs:  # the cap binds only where a < 0 and the ratio exceeds it: make sure such tokens exist
        logp = torch.log_softmax(logits, -1).gather(-1, batch["targets"][..., None])[..., 0].float()
        batch["old_logp"][0] = logp[0] - 0.5  # ratio e^0.5 = 1.65 > delta
        batch["advantages"][0] = -1.0
    base = dict(method="dapo", backend="torch", kl_coef=knobs.get("kl_coef", 0.0))
    plain, g_plain = run(logits, batch, erpo.LossConfig(**base))
    with_knob, g_knob = run(logits, batch, erpo.LossConfig(**{**base, **knobs}))
    assert (g_plain - g_knob).abs().max() > 1e-6 * g_plain.abs().max()
    if metric is not None:
        assert with_knob.metrics[metric] > 0 and metric not in plain.metrics


def test_a_control_acts_on_every_objective_it_composes_with():
    logits, batch = make(spread=1.0)
    for objective in ("clip", "cispo", "sapo", "vespo", "gpg"):
        base = dict(method="dapo", backend="torch", objective=objective)
        for control in ("high_entropy_mask", "entropy_advantage", "kl_cov", "repo"):
            _, g_without = run(logits, batch, erpo.LossConfig(**base))
            _, g_with = run(logits, batch, erpo.LossConfig(**base, controls=(control,)))
            assert (g_without - g_with).abs().max() > 0, (objective, control)


def test_delta_caps_the_unclipped_ratio():
    """INTELLECT-2: a > 0 token with ratio above delta contributes -a delta and no gradient."""
    logp = torch.tensor([[-1.0, -1.0]], dtype=torch.float64, requires_grad=True)
    batch = {"mask": torch.ones(1, 2, dtype=torch.bool), "old_logp": torch.tensor([[-2.0, -1.0]]),
             "advantages": torch.tensor([-1.0])}  # a < 0: the unclipped term -a r is the max
    config = erpo.LossConfig(method="dapo", delta=2.0, agg="seq-mean-token-sum", backend="torch")
    result = erpo.token_policy_loss(logp, None, batch, config)
    result.loss.backward()
    # token 0: r = e > delta -> -a min(r, delta) = 2; token 1: r = 1 -> 1
    torch.testing.assert_close(result.loss, torch.tensor(3.0, dtype=torch.float64))
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 1.0]], dtype=torch.float64))


def test_sequence_ratio_equals_trls_sequence_form_under_uniform_weights():
    """erpo's GSPO-token form sg(s_i) pi/sg(pi) and TRL's s_i = exp(mean log-ratio) (gradient 1/|y_i| to each
    token) give the same loss and gradient for every aggregation whose weights are constant within a response."""
    logits, batch = make(spread=0.2)
    mask, old, adv = batch["mask"], batch["old_logp"].double(), batch["advantages"].double()
    for agg in ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum"):
        config = erpo.LossConfig(method="gspo", eps_low=0.05, eps_high=0.05, agg=agg, backend="torch")
        leaf = logits.detach().clone().requires_grad_()
        logp = torch.log_softmax(leaf, -1).gather(-1, batch["targets"][..., None])[..., 0]
        log_s = (torch.where(mask, logp - old, 0.0)).sum(1) / mask.sum(1).clamp_min(1)
        s = torch.exp(log_s)[:, None]
        per_token = -torch.minimum(s * adv[:, None], s.clamp(0.95, 1.05) * adv[:, None]).expand(B, L)
        per_token = torch.where(mask, per_token, 0.0)
        lengths = mask.sum(1)
        if agg == "token-mean":
            trl = per_token.sum() / mask.sum()
        elif agg == "seq-mean-token-sum":
            trl = per_token.sum(1).mean()
        else:
            trl = (per_token.sum(1)[lengths > 0] / lengths[lengths > 0]).mean()
        trl.backward()
        ours, g_ours = run(logits, batch, config)
        torch.testing.assert_close(ours.loss, trl, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(g_ours, leaf.grad, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("knobs", [dict(method=m) for m in METHODS] + COMPOSED[:6],
                         ids=lambda k: "-".join(str(v) for v in k.values()))
def test_token_policy_loss_equals_policy_loss(knobs):
    logits, batch = make()
    config = erpo.LossConfig(backend="torch", **knobs)
    want, g_want = run(logits, batch, config)
    leaf = logits.detach().clone().requires_grad_()
    logp, entropy = erpo.logprobs_and_entropy(leaf, batch["targets"].clamp_min(0), backend="torch")
    token_batch = {k: v for k, v in batch.items() if k != "targets"}
    got = erpo.token_policy_loss(logp, entropy if config.needs_entropy else None, token_batch, config)
    got.loss.backward()
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(leaf.grad, g_want, rtol=1e-9, atol=1e-13)


def test_token_policy_loss_without_entropy_refuses_a_config_that_reads_it():
    _, batch = make()
    logp = torch.randn(B, L).clamp(max=0)
    for config in (erpo.LossConfig(method="high_entropy_mask"), erpo.LossConfig(method="dapo", entropy_coef=0.01),
                   erpo.LossConfig(method="adapo")):
        with pytest.raises(ValueError, match="reads the entropy"):
            erpo.token_policy_loss(logp, None, batch, config)
    result = erpo.token_policy_loss(logp, None, batch, erpo.LossConfig(method="dapo"))
    assert "entropy" not in result.metrics  # no made-up entropy metric


@pytest.mark.parametrize("knobs", [
    dict(method="dapo"), dict(method="grpo"), dict(method="dr_grpo", max_len=9), dict(method="luspo"),
    dict(method="gspo"), dict(method="cispo"), dict(method="sapo"), dict(method="vespo"), dict(method="gmpo"),
    dict(method="bnpo", agg="seq-mean-token-sum"), dict(method="dapo", rollout_is="sequence_mask", rollout_is_max=2.0),
], ids=lambda k: "-".join(str(v) for v in k.values()))
def test_micro_batches_with_global_normalizers_sum_to_the_big_batch(knobs):
    """Gradient accumulation: with the step's counts in the batch, the micro-batch losses (and gradients) add up
    to the loss of the whole batch, for any split."""
    logits, batch = make()
    config = erpo.LossConfig(backend="torch", **knobs)
    whole, g_whole = run(logits, batch, config)
    mask = batch["mask"]
    counts = {"num_items_in_batch": mask.sum().item(), "num_seqs_in_batch": float(B)}
    if config.agg == "seq-mean-token-mean":
        counts["num_seqs_in_batch"] = float((mask.sum(1) > 0).sum())
    total, grads = 0.0, []
    for rows in (slice(0, 2), slice(2, 5), slice(5, 6)):
        part = {k: v[rows] for k, v in batch.items()}
        result, g = run(logits[rows], {**part, **counts}, config)
        total, grads = total + result.loss, grads + [g]
    torch.testing.assert_close(total, whole.loss, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(torch.cat(grads), g_whole, rtol=1e-9, atol=1e-13)


def test_the_normalizer_is_what_divides():
    logits, batch = make()
    local, _ = run(logits, batch, erpo.LossConfig(method="dapo", backend="torch"))
    doubled, _ = run(logits, {**batch, "num_items_in_batch": 2 * batch["mask"].sum().item()},
                     erpo.LossConfig(method="dapo", backend="torch"))
    torch.testing.assert_close(doubled.loss, local.loss / 2)


@pytest.mark.parametrize("value,error", [(0, ValueError), (-3.0, ValueError), (True, TypeError), ("9", TypeError),
                                         (torch.ones(2), TypeError)])
def test_bad_normalizers_are_refused(value, error):
    logits, batch = make()
    with pytest.raises(error, match="num_items_in_batch"):
        erpo.policy_loss(logits, {**batch, "num_items_in_batch": value}, erpo.LossConfig(method="dapo"))
    with pytest.raises(ValueError, match="num_seqs_in_batch"):
        erpo.policy_loss(logits, {**batch, "num_seqs_in_batch": torch.tensor(0.0)}, erpo.LossConfig(method="dapo"))


@pytest.mark.parametrize("knobs,match", [
    (dict(objective="ppo"), "objective"),
    (dict(is_level="group"), "is_level"),
    (dict(controls=("entropy_mask",)), "controls"),
    (dict(controls=("kl_cov", "kl_cov")), "twice"),
    (dict(controls=("repo", "repo_r")), "alternative"),
    (dict(controls=("clip_cov", "kl_cov")), "alternative"),
    (dict(objective="gmpo", controls=("high_entropy_mask",)), "gmpo"),
    (dict(objective="gmpo", is_level="sequence"), "gmpo"),
    (dict(objective="vespo", is_level="sequence"), "vespo"),
    (dict(objective="vespo", rollout_is="sequence_mask", rollout_is_max=2.0), "vespo"),
    (dict(objective="gpg", is_level="sequence"), "gpg"),
    (dict(objective="cispo", delta=2.0), "delta"),
    (dict(delta=1.1), "delta"),
    (dict(objective="sapo", dual_clip=True), "dual_clip"),
    (dict(objective="sapo", controls=("archer",)), "archer"),
    (dict(objective="gpg", controls=("adapo",)), "adapo"),
    (dict(kl_bias_correction=True), "kl_coef"),
    (dict(kl_bias_correction=1), "kl_bias_correction"),
    (dict(entropy_target=-1.0), "entropy_target"),
    (dict(entropy_target=0.5, entropy_coef=2.0), "entropy_coef_max"),
    (dict(entropy_target=0.5, entropy_coef_step=0.0), "entropy_coef_step"),
    (dict(off_policy_mask=-0.1), "off_policy_mask"),
    (dict(rollout_is="token_clip"), "rollout_is"),
    (dict(rollout_is="token_mask", rollout_is_min=2.0, rollout_is_max=1.0), "rollout_is_min"),
    (dict(cispo_clip="lower"), "cispo_clip"),
    (dict(sapo_tau_pos=0.0), "sapo_tau_pos"),
    (dict(archer_rho=1.0), "archer_rho"),
    (dict(entropy_adv_kappa=True), "entropy_adv_kappa"),
], ids=lambda k: "-".join(str(v) for v in k.values()) if isinstance(k, dict) else k)
def test_bad_configs_name_the_field(knobs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        erpo.LossConfig(method="dapo", **knobs)


def test_a_preset_cannot_drop_its_own_control():
    with pytest.raises(ValueError, match="built on"):
        erpo.LossConfig(method="erpo", controls=("high_entropy_mask",))
    config = erpo.LossConfig(method="erpo", controls="erpo, high_entropy_mask")
    assert config.controls == ("erpo", "high_entropy_mask")


def test_every_control_is_known_and_ordered():
    from erpo.losses.controls import names

    ORDER = names()

    assert set(ORDER) == set(CONTROLS)


def test_presets_keep_their_behaviour():
    """method= is a preset of the composable fields: the old presets still have their old defaults."""
    assert erpo.LossConfig(method="kl_cov").objective == "plain"
    assert erpo.LossConfig(method="grpo").controls == () and erpo.LossConfig(method="grpo").kl_coef == 0.04
    assert erpo.LossConfig(method="erpo").controls == ("erpo",)
    assert erpo.LossConfig(method="gspo").is_level == "sequence"
    assert erpo.LossConfig(method="cispo").cispo_clip == "upper"


def test_a_batch_missing_what_the_config_needs_raises_at_once():
    logits, batch = make()
    no_rollout = {k: v for k, v in batch.items() if k != "rollout_logp"}
    with pytest.raises(ValueError, match="rollout_logp"):
        erpo.policy_loss(logits, no_rollout, erpo.LossConfig(method="dapo", rollout_is="token_mask", rollout_is_max=2.0))
    no_groups = {k: v for k, v in batch.items() if k != "group_ids"}
    with pytest.raises(ValueError, match="group_ids"):
        erpo.policy_loss(logits, no_groups, erpo.LossConfig(method="gspo", controls=("erpo",), eta=0.0))
    no_ref = {k: v for k, v in batch.items() if k != "ref_logp"}
    with pytest.raises(ValueError, match="ref_logp"):
        erpo.policy_loss(logits, no_ref, erpo.LossConfig(method="cispo", kl_coef=0.1))
    positive = batch["rollout_logp"].clone()
    positive[0, 0] = 0.5  # a valid token (random_batch keeps column 0)
    bad_rollout = {**batch, "rollout_logp": positive}
    with pytest.raises(ValueError, match="rollout_logp"):
        erpo.policy_loss(logits, bad_rollout, erpo.LossConfig(method="dapo", rollout_is="token_mask", rollout_is_max=2.0))


def test_an_unscored_rollout_token_gets_no_correction():
    """NaN from the engine (a token it could not score): weight 1 for that token, as TRL."""
    logits, batch = make()
    config = erpo.LossConfig(method="dapo", rollout_is="token_truncate", rollout_is_max=1.0e9, rollout_is_min=1e-9,
                             backend="torch")
    unscored = batch["rollout_logp"].clone()
    unscored[0, 0] = float("nan")
    exact = batch["rollout_logp"].clone()
    exact[0, 0] = batch["old_logp"][0, 0]
    got, _ = run(logits, {**batch, "rollout_logp": unscored}, config)
    want, _ = run(logits, {**batch, "rollout_logp": exact}, config)
    torch.testing.assert_close(got.loss, want.loss)


def test_adaptive_entropy_coefficient_follows_trls_rule():
    config = erpo.LossConfig(method="dapo", entropy_coef=0.01, entropy_target=0.5, entropy_coef_step=0.01,
                             entropy_coef_min=0.0, entropy_coef_max=0.03)
    controller = controllers_lib.make_controller(config)
    applied = [controller.apply(config).entropy_coef]
    for entropy in (0.4, 0.3, 0.2, 0.1, 0.9, 0.9, 0.9, 0.9, 0.45):
        controller.step({"entropy": torch.tensor(entropy)})
        applied.append(controller.apply(config).entropy_coef)
    # TRL: no bonus before the first measurement (last entropy = inf); up by step while entropy <= target
    # (capped at max), down while above (floored at min), applied only while the last entropy <= target.
    expected = [0.0, 0.02, 0.03, 0.03, 0.03, 0.0, 0.0, 0.0, 0.0, 0.01]
    assert applied == pytest.approx(expected)


def test_several_controllers_compose_and_round_trip_through_the_module_state():
    config = erpo.LossConfig(method="dapo", controls=("repo_r", "adapo", "kl_cov"), kl_cov_anneal="linear", eps_high_max=2.0,
                             entropy_coef=0.01, entropy_target=0.5, target_entropy=0.8)
    loss_fn = erpo.PolicyLoss(config)
    assert isinstance(loss_fn.controller, controllers_lib.Controllers)
    for entropy in (0.3, 0.2):
        loss_fn.controller.step({"entropy": torch.tensor(entropy)})
    moved = loss_fn.current_config()
    assert moved.zeta == pytest.approx(4 * config.zeta) and moved.eps_high == pytest.approx(4 * config.eps_high)
    assert moved.kl_cov_beta < config.kl_cov_beta and moved.entropy_coef > 0
    again = erpo.PolicyLoss(config)
    again.load_state_dict(loss_fn.state_dict())
    assert again.current_config() == moved
    with pytest.raises(ValueError, match="controller"):
        erpo.PolicyLoss(erpo.LossConfig(method="repo_r")).load_state_dict(loss_fn.state_dict())


def test_an_unknown_name_gets_a_suggestion():
    with pytest.raises(ValueError, match="did you mean 'erpo'"):
        erpo.LossConfig(method="erpoo")
    with pytest.raises(ValueError, match="did you mean 'high_entropy_mask'"):
        erpo.LossConfig(method="dapo", controls="high_entropy_masks")
