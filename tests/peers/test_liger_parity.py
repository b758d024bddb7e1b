"""erpo.linear_policy_loss == Liger-Kernel 0.8.5 LigerFusedLinearGRPOLoss (chunked, plain torch; compiled=False)
from the same hidden states and head: loss and gradients w.r.t. hidden, weight and bias, fp32, 1e-5 relative.

Both take TRL's options; erpo's LossConfig comes from `loss_config_from_trl` on the equivalent GRPOConfig.
"""
import pytest
import torch

from tests.peers.inputs import assert_close, loss_floor, near, token_inputs
from tests.peers.trl_reference import vllm_ratio

VOCAB, HIDDEN = 37, 16

# (loss_type, options shared by GRPOConfig and Liger, vLLM IS mode or None)
CASES = [
    *[(loss_type, {}, None) for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "vespo")],
    ("luspo", {"importance_sampling_level": "sequence"}, None),
    ("grpo", {"importance_sampling_level": "sequence"}, None),
    ("grpo", {"beta": 0.04}, None),
    ("dapo", {"beta": 0.1, "use_bias_correction_kl": True}, None),
    ("dapo", {"delta": 1.4}, None),
    ("cispo", {"epsilon_high": 1.2}, None),
    ("sapo", {"temperature": 0.7}, None),
    ("dapo", {}, "token_truncate"),
    ("dapo", {}, "sequence_mask"),
    ("vespo", {}, "token_mask"),
]


def _ids(case):
    return f"{case[0]}-{'-'.join(f'{k}={v}' for k, v in case[1].items()) or 'default'}-{case[2]}"


@pytest.mark.parametrize("loss_type,options,vllm_mode", CASES, ids=[_ids(c) for c in CASES])
def test_fused_linear_loss_and_grads_match_liger(liger_grpo, trl_grpo, tmp_path, loss_type, options, vllm_mode):
    import erpo
    from trl import GRPOConfig

    from erpo.integrations.trl import loss_config_from_trl

    x = token_inputs()
    batch_size, length = x.mask.shape
    hidden = torch.randn(batch_size, length, HIDDEN)
    weight = torch.randn(VOCAB, HIDDEN) / HIDDEN ** 0.5
    bias = 0.1 * torch.randn(VOCAB)
    targets = torch.randint(0, VOCAB, (batch_size, length))
    with torch.no_grad():  # old / ref log-probs near the current policy's, so ratios fall on both sides of the clip
        logits = (hidden @ weight.T + bias) / options.get("temperature", 1.0)
        current = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
    x.old, x.ref = near(current, 0.3), near(current, 0.3)
    x.rollout = near(x.old, 0.3)
    num_items = x.mask.sum() * 2

    trl_args = dict(options)
    grpo_args = GRPOConfig(output_dir=str(tmp_path), loss_type=loss_type, max_completion_length=9, report_to="none",
                           use_cpu=True, per_device_train_batch_size=5, num_generations=5,
                           vllm_importance_sampling_correction=vllm_mode is not None,
                           **({"vllm_importance_sampling_mode": vllm_mode} if vllm_mode else {}), **trl_args)
    liger = liger_grpo.LigerFusedLinearGRPOLoss(
        beta=grpo_args.beta, compiled=False, use_ref_model=grpo_args.beta != 0, chunk_size=2,
        epsilon_low=grpo_args.epsilon,
        epsilon_high=grpo_args.epsilon_high if grpo_args.epsilon_high is not None else grpo_args.epsilon,
        loss_type=loss_type, max_completion_length=grpo_args.max_completion_length,
        importance_sampling_level=grpo_args.importance_sampling_level, temperature=grpo_args.temperature,
        delta=grpo_args.delta, use_bias_correction_kl=grpo_args.use_bias_correction_kl,
    )
    peer = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    ratio = None if vllm_mode is None else vllm_ratio(x, vllm_mode, grpo_args.vllm_importance_sampling_clip_min,
                                                      grpo_args.vllm_importance_sampling_clip_max)
    expected, _ = liger(peer[0], peer[1], targets, x.mask, x.advantages, bias=peer[2],
                        ref_per_token_logps=x.ref if grpo_args.beta != 0 else None, old_per_token_logps=x.old,
                        vllm_is_ratio=ratio, num_items_in_batch=num_items)
    expected.backward()

    config = loss_config_from_trl(grpo_args, use_vllm=vllm_mode is not None)
    ours = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    batch = {"targets": targets, "mask": x.mask, "old_logp": x.old, "advantages": x.advantages}
    if grpo_args.beta != 0:
        batch["ref_logp"] = x.ref
    if vllm_mode is not None:
        batch["rollout_logp"] = x.rollout
    if loss_type in ("dapo", "cispo", "vespo"):
        batch["num_items_in_batch"] = num_items
    result = erpo.linear_policy_loss(ours[0], ours[1], batch, config, bias=ours[2])
    result.loss.backward()

    assert_close(result.loss, expected, "loss", floor=loss_floor(x.advantages))
    for name, mine, theirs in zip(("hidden", "weight", "bias"), ours, peer):
        assert theirs.grad is not None and theirs.grad.abs().sum() > 0, f"Liger gives no gradient w.r.t. {name}"
        assert_close(mine.grad, theirs.grad, f"d loss / d {name}")


def test_luspo_kl_over_padding_differs_from_liger(liger_grpo, trl_grpo, tmp_path):
    """Deliberate difference (Liger's bug; docs/losses.md, "Parity with the peers"): Liger 0.8.5's LUSPO weighs the
    unmasked (B, T) per-token loss by the response length and divides by B·T, so its KL term averages every position,
    padding included (sum_t kl_t L_i / (B T)); TRL masks first (sum over valid t of kl_t / B), and erpo is TRL's. The
    policy term agrees (one sequence-level value per response); the difference is exactly the KL aggregation."""
    import erpo
    from trl import GRPOConfig

    from erpo.integrations.trl import loss_config_from_trl
    from tests.peers.trl_reference import trl_inputs, trl_loss

    x = token_inputs(dtype=torch.float64)
    batch_size, length = x.mask.shape
    hidden = torch.randn(batch_size, length, HIDDEN, dtype=torch.float64)
    weight = torch.randn(VOCAB, HIDDEN, dtype=torch.float64) / HIDDEN ** 0.5
    targets = torch.randint(0, VOCAB, (batch_size, length))
    current = torch.log_softmax(hidden @ weight.T, -1).gather(-1, targets[..., None])[..., 0]
    x.old, x.ref = near(current, 0.3), near(current, 0.3)
    x.mask[1, 2:] = 0  # a short response, and a reference far from the policy on its padding: a large padding KL
    x.ref[1, 2:] = x.ref[1, 2:] - 1.5
    beta = 0.05
    args = GRPOConfig(output_dir=str(tmp_path), loss_type="luspo", importance_sampling_level="sequence", beta=beta,
                      report_to="none", use_cpu=True, per_device_train_batch_size=5, num_generations=5)
    liger_losses = []
    for liger_beta in (beta, 0.0):  # Liger's KL term: the difference of its losses with and without it
        liger = liger_grpo.LigerFusedLinearGRPOLoss(
            beta=liger_beta, compiled=False, use_ref_model=True, chunk_size=2, loss_type="luspo",
            importance_sampling_level="sequence", epsilon_low=args.epsilon,
            epsilon_high=args.epsilon_high if args.epsilon_high is not None else args.epsilon)
        liger_losses.append(liger(hidden, weight, targets, x.mask, x.advantages, ref_per_token_logps=x.ref,
                                  old_per_token_logps=x.old)[0].double())
    batch = {"targets": targets, "mask": x.mask, "old_logp": x.old, "ref_logp": x.ref, "advantages": x.advantages}
    ours = erpo.linear_policy_loss(hidden.float(), weight.float(), {
        k: v.float() if v.dtype == torch.float64 else v for k, v in batch.items()}, loss_config_from_trl(args)).loss
    trl, _ = trl_loss(trl_grpo, args, current, torch.zeros_like(current), trl_inputs(x, use_ref=True))
    assert_close(ours, trl, "erpo == TRL (KL masked first)", floor=loss_floor(x.advantages))
    kl = torch.exp(x.ref - current) - (x.ref - current) - 1
    trl_kl = (kl * x.mask).sum() / batch_size
    liger_kl = (kl * x.mask.sum(-1, keepdim=True)).sum() / (batch_size * length)
    # Liger computes in fp32: its KL term, a difference of two O(1) losses, carries their rounding (1e-3 relative)
    assert_close(liger_losses[0] - liger_losses[1], beta * liger_kl, "Liger's KL: every B·T position, padding included",
                 rtol=1e-3)
    assert (liger_kl - trl_kl).abs() > 0.05 * trl_kl, "the inputs must tell the two KL aggregations apart"
