"""erpo.token_policy_loss == TRL 1.16 GRPOTrainer._compute_loss (its own code, see trl_reference.py) on identical
per-token inputs: loss and gradient w.r.t. logp (and entropy, where a term uses it), fp32, 1e-5 relative.

erpo's LossConfig comes from `erpo.integrations.trl.loss_config_from_trl(GRPOConfig)`, so these tests also check
the mapping the drop-in trainer uses.
"""
import pytest
import torch

from tests.peers.inputs import TokenInputs, assert_close, loss_floor, token_inputs
from tests.peers.trl_reference import trl_inputs, trl_loss

# (loss_type, GRPOConfig overrides, vLLM IS mode or None)
CASES = [
    *[(loss_type, {}, None) for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "vespo")],
    ("luspo", {"importance_sampling_level": "sequence"}, None),
    ("grpo", {"importance_sampling_level": "sequence"}, None),
    ("grpo", {"beta": 0.04}, None),
    ("dapo", {"beta": 0.1, "use_bias_correction_kl": True}, None),
    ("dapo", {"delta": 1.4}, None),
    ("dapo", {"epsilon": 0.1, "epsilon_high": 0.3}, None),
    ("cispo", {"epsilon_high": 1.2}, None),
    ("sapo", {"sapo_temperature_pos": 0.7, "sapo_temperature_neg": 1.6}, None),
    ("dapo", {"top_entropy_quantile": 0.3}, None),
    ("dapo", {"top_entropy_quantile": 0.5, "beta": 0.05}, None),
    ("dapo", {"top_entropy_quantile": 0.0}, None),  # TRL: keep only the highest-entropy token (erpo's rho = 0)
    ("grpo", {"top_entropy_quantile": 0.0, "beta": 0.05}, None),
    ("bnpo", {"entropy_coef": 0.02}, None),
    ("dapo", {"off_policy_mask_threshold": 0.02}, None),
    ("dapo", {"off_policy_mask_threshold": 0.02}, "token_truncate"),
    *[("dapo", {"vllm_importance_sampling_clip_min": 0.8, "vllm_importance_sampling_clip_max": 1.3}, mode)
      for mode in ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")],
    ("grpo", {"vllm_importance_sampling_clip_max": 1.2}, "token_truncate"),
    ("vespo", {"vllm_importance_sampling_clip_max": 1.3}, "token_truncate"),
]


def _grpo_config(tmp_path, loss_type, overrides, vllm_mode):
    from trl import GRPOConfig

    kwargs = dict(output_dir=str(tmp_path), loss_type=loss_type, max_completion_length=9, report_to="none",
                  use_cpu=True, per_device_train_batch_size=5, num_generations=5)
    if vllm_mode is not None:
        kwargs.update(vllm_importance_sampling_correction=True, vllm_importance_sampling_mode=vllm_mode)
    kwargs.update(overrides)
    return GRPOConfig(**kwargs)


def erpo_side(args, x, vllm_mode, num_items=None, num_seqs=None):
    import erpo
    from erpo.integrations.trl import loss_config_from_trl

    config = loss_config_from_trl(args, use_vllm=vllm_mode is not None)
    logp, entropy = x.fresh()
    batch = {"mask": x.mask, "old_logp": x.old, "advantages": x.advantages}
    if args.beta != 0:
        batch["ref_logp"] = x.ref
    if vllm_mode is not None:
        batch["rollout_logp"] = x.rollout
    if num_items is not None:
        batch["num_items_in_batch"] = num_items
    if num_seqs is not None:
        batch["num_seqs_in_batch"] = num_seqs
    result = erpo.token_policy_loss(logp, entropy, batch, config)
    result.loss.backward()
    return result, logp.grad, entropy.grad


@pytest.mark.parametrize("loss_type,overrides,vllm_mode", CASES,
                         ids=[f"{c[0]}-{'-'.join(f'{k}={v}' for k, v in c[1].items()) or 'default'}-{c[2]}" for c in CASES])
def test_loss_and_grad_match_trl(trl_grpo, tmp_path, loss_type, overrides, vllm_mode):
    args = _grpo_config(tmp_path, loss_type, overrides, vllm_mode)
    x = token_inputs()
    num_items = x.mask.sum() * 3 if loss_type in ("dapo", "cispo", "vespo") else None  # a global normaliser
    inputs = trl_inputs(x, use_ref=args.beta != 0, vllm_mode=vllm_mode,
                        clip_min=args.vllm_importance_sampling_clip_min,
                        clip_max=args.vllm_importance_sampling_clip_max)
    if num_items is not None:
        inputs["num_items_in_batch"] = num_items
    logp, entropy = x.fresh()
    expected, _ = trl_loss(trl_grpo, args, logp, entropy, inputs, use_vllm=vllm_mode is not None)
    expected.backward()

    result, grad_logp, grad_entropy = erpo_side(args, x, vllm_mode, num_items)
    assert_close(result.loss, expected, "loss", floor=loss_floor(x.advantages))
    assert_close(grad_logp, logp.grad, "d loss / d logp")
    if entropy.grad is not None:
        assert_close(grad_entropy, entropy.grad, "d loss / d entropy")
    else:
        assert grad_entropy is None or not grad_entropy.any(), "erpo has an entropy gradient where TRL has none"


def test_gradient_is_not_trivially_zero(trl_grpo, tmp_path):
    """The comparison above would pass on two zero gradients: the inputs must clip some tokens and not others."""
    args = _grpo_config(tmp_path, "dapo", {}, None)
    x = token_inputs()
    logp, entropy = x.fresh()
    loss, metrics = trl_loss(trl_grpo, args, logp, entropy, trl_inputs(x))
    loss.backward()
    assert logp.grad.abs().sum() > 0
    assert 0 < (logp.grad[x.mask.bool()] == 0).sum() < x.mask.sum(), "inputs must clip some, not all, tokens"


@pytest.mark.parametrize("loss_type,overrides", [
    ("grpo", {}), ("bnpo", {}), ("dr_grpo", {}), ("dapo", {}), ("cispo", {}), ("sapo", {}), ("vespo", {}),
    ("luspo", {"importance_sampling_level": "sequence"}), ("grpo", {"beta": 0.04}),
])
def test_entropy_bonus_matches_trl_for_every_loss_type(trl_grpo, tmp_path, loss_type, overrides):
    """TRL adds entropy_coef x the token mean of the entropy whatever the loss type, and so does erpo (issue 28: erpo
    aggregated it like the policy term, 13.3x the coefficient under LUSPO). Loss and gradients w.r.t. logp and the
    entropy equal TRL's for every loss type (fp64: the bonus is a small part of the loss)."""
    args = _grpo_config(tmp_path, loss_type, {"entropy_coef": 0.05, **overrides}, None)
    x = token_inputs(dtype=torch.float64)
    inputs = trl_inputs(x, use_ref=args.beta != 0)
    num_items = x.mask.sum() if loss_type in ("dapo", "cispo", "vespo") else None
    logp, entropy = x.fresh()
    expected, _ = trl_loss(trl_grpo, args, logp, entropy, inputs)
    expected.backward()
    result, grad_logp, grad_entropy = erpo_side(args, x, None, num_items)
    assert_close(result.loss, expected, "loss", floor=loss_floor(x.advantages))
    assert_close(grad_logp, logp.grad, "d loss / d logp")
    assert_close(grad_entropy, entropy.grad, "d loss / d entropy")


def test_entropy_bonus_over_an_accumulation_window_differs_from_trl(trl_grpo, tmp_path):
    """Deliberate difference (docs/losses.md, "Parity with the peers"): for the loss types TRL normalises by the
    window's token count (dapo, cispo, vespo), TRL still adds each micro-batch's own entropy mean / accumulation steps,
    so micro-batches of unequal size weigh their tokens unequally; erpo divides the bonus by num_items_in_batch like the
    policy term: the window's token mean. The policy terms agree; the bonuses differ by exactly that."""
    args = _grpo_config(tmp_path, "dapo", {"entropy_coef": 0.05, "gradient_accumulation_steps": 2}, None)
    assert args.steps_per_generation == 2  # TRL's normaliser: num_items_in_batch x accumulation / steps_per_generation
    x = token_inputs(batch=6, dtype=torch.float64)
    x.mask[3:, 2:] = 0  # the second micro-batch has fewer valid tokens than the first
    window = x.mask.sum()
    trl_total, erpo_total, means = 0.0, 0.0, []
    for rows in (slice(0, 3), slice(3, 6)):
        part = TokenInputs(*(getattr(x, f)[rows].detach() for f in ("logp", "entropy", "old", "ref", "rollout", "mask",
                                                                      "advantages")))
        inputs = trl_inputs(part)
        inputs["num_items_in_batch"] = window
        logp, entropy = part.fresh()
        trl_total = trl_total + trl_loss(trl_grpo, args, logp, entropy, inputs, accumulation=2)[0]
        erpo_total = erpo_total + erpo_side(args, part, None, window)[0].loss
        means.append((part.entropy * part.mask).sum() / part.mask.sum())
    window_mean = (x.entropy * x.mask).sum() / window
    assert_close(erpo_total - trl_total, -0.05 * (window_mean - (means[0] + means[1]) / 2),
                 "erpo - TRL: the window's token mean vs the mean of the micro-batch means")
    assert (window_mean - (means[0] + means[1]) / 2).abs() > 1e-3


def test_empty_response_counts_like_trl_with_num_seqs(trl_grpo, tmp_path):
    """Deliberate difference: TRL's per-response mean (grpo, sapo, luspo, dr_grpo) divides by every completion of the
    micro-batch, a completion with no valid token included; erpo's seq-mean divides by the responses that have a
    valid token (as verl's agg_loss), unless the batch gives num_seqs_in_batch, which the TRL drop-in passes."""
    args = _grpo_config(tmp_path, "grpo", {}, None)
    x = token_inputs()
    x.mask[3] = 0
    logp, entropy = x.fresh()
    expected, _ = trl_loss(trl_grpo, args, logp, entropy, trl_inputs(x))
    expected.backward()
    result, _, _ = erpo_side(args, x, None)
    assert_close(result.loss * 4 / 5, expected, "erpo's mean over the 4 non-empty responses, rescaled to TRL's 5")
    result, grad_logp, _ = erpo_side(args, x, None, num_seqs=torch.tensor(5.0))
    assert_close(result.loss, expected, "loss with num_seqs_in_batch = 5", floor=loss_floor(x.advantages))
    assert_close(grad_logp, logp.grad, "d loss / d logp with num_seqs_in_batch = 5")


def test_entropy_bonus_with_80_20_mask_differs_from_trl(trl_grpo, tmp_path):
    """Deliberate difference: with top_entropy_quantile < 1, TRL's entropy bonus is the mean entropy of the kept
    (high-entropy) tokens only; erpo's 80/20 mask drops the policy-gradient term only, and the entropy bonus stays
    on every valid token (docs/losses.md, "Method details" and "Parity with the peers")."""
    args = _grpo_config(tmp_path, "bnpo", {"entropy_coef": 0.02, "top_entropy_quantile": 0.5}, None)
    x = token_inputs()  # fp32: TRL takes its quantile in fp32, so fp64 entropies could tie differently at it
    logp, entropy = x.fresh()
    expected, _ = trl_loss(trl_grpo, args, logp, entropy, trl_inputs(x))
    result, _, _ = erpo_side(args, x, None)
    valid = x.mask.bool()
    kept = valid & (x.entropy >= torch.quantile(x.entropy[valid], 0.5))
    all_mean, kept_mean = x.entropy[valid].mean(), x.entropy[kept].mean()
    assert kept.sum() < valid.sum()
    assert_close(result.loss - expected, -0.02 * (all_mean - kept_mean), "difference of the entropy terms",
                 floor=loss_floor(x.advantages))
