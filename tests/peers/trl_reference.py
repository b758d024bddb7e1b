"""TRL 1.16's own `GRPOTrainer._compute_loss`, run on given per-token log-probs and entropies.

`_compute_loss` gets its log-probs from `self._get_per_token_logps_and_entropies(model, ...)`; here `self` is a
stand-in that carries the attributes `_compute_loss` reads (set from a real `GRPOConfig` exactly as TRL's
`__init__` sets them) and returns the given leaf tensors from that method, so the loss and its gradient
w.r.t. logp and entropy are TRL's code, line for line, on one process without gradient accumulation.
"""
import functools
import types
from collections import defaultdict

import torch


class _OneProcess:
    """accelerate.Accelerator's collective calls on a single process (identity)."""

    num_processes = 1
    sync_gradients = True

    def gather(self, tensor):
        return tensor

    gather_for_metrics = gather

    def reduce(self, tensor, reduction="sum"):
        return tensor

    def pad_across_processes(self, tensor, dim=0, pad_index=0):
        return tensor


def trl_loss(grpo_module, args, logp, entropy, inputs: dict, use_vllm: bool = False, training: bool = True,
             accumulation: int = 1):
    """TRL's loss for `args` (a GRPOConfig) on `inputs` (TRL's batch dict) with per-token `logp` and `entropy`;
    `accumulation`: TRL's current_gradient_accumulation_steps (one micro-batch of that window)."""
    trainer_cls = grpo_module.GRPOTrainer
    fake = types.SimpleNamespace()
    fake.args = args
    fake.loss_type = args.loss_type
    fake.beta = args.beta
    fake.epsilon_low = args.epsilon
    fake.epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    fake.importance_sampling_level = args.importance_sampling_level
    fake.off_policy_mask_threshold = args.off_policy_mask_threshold
    fake.top_entropy_quantile = args.top_entropy_quantile
    fake.entropy_coef = args.entropy_coef
    fake.use_adaptive_entropy = args.use_adaptive_entropy
    fake._entropy_bonus_enabled = args.entropy_coef != 0.0 or args.use_adaptive_entropy
    fake.use_vllm = use_vllm
    fake.vllm_importance_sampling_correction = args.vllm_importance_sampling_correction
    fake.max_completion_length = args.max_completion_length
    fake.current_gradient_accumulation_steps = accumulation
    fake.aux_loss_enabled = False
    fake.accelerator = _OneProcess()
    fake.model = types.SimpleNamespace(training=training)
    fake._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    fake.get_high_entropy_mask = functools.partial(trainer_cls.get_high_entropy_mask, fake)
    fake.get_off_policy_mask = trainer_cls.get_off_policy_mask
    fake.get_gamma_weights = trainer_cls.get_gamma_weights
    fake._get_per_token_logps_and_entropies = lambda *a, **k: (logp, entropy, None)
    loss = trainer_cls._compute_loss(fake, None, inputs)
    return loss, fake._metrics


def trl_inputs(x, use_old=True, use_ref=False, vllm_mode=None, clip_min=None, clip_max=3.0):
    """TRL's batch dict for TokenInputs `x` (prompt ids are never read by the stand-in)."""
    batch, length = x.mask.shape
    inputs = {
        "prompt_ids": torch.zeros(batch, 1, dtype=torch.long), "prompt_mask": torch.ones(batch, 1, dtype=torch.long),
        "completion_ids": torch.zeros(batch, length, dtype=torch.long), "completion_mask": x.mask,
        "advantages": x.advantages, "num_items_in_batch": x.mask.sum(),
    }
    if use_old:
        inputs["old_per_token_logps"] = x.old
    if use_ref:
        inputs["ref_per_token_logps"] = x.ref
    if vllm_mode is not None:
        inputs["sampling_per_token_logps"] = x.rollout
        inputs["importance_sampling_ratio"] = vllm_ratio(x, vllm_mode, clip_min, clip_max)
    return inputs


def vllm_ratio(x, mode, clip_min, clip_max):
    """TRL's importance_sampling_ratio (grpo_trainer.py, _generate_and_score_completions), same formula."""
    diff = torch.nan_to_num((x.old - x.rollout) * x.mask, nan=0.0)
    if mode.startswith("sequence"):
        diff = diff.sum(dim=-1, keepdim=True)
    ratio = torch.exp(diff)
    if mode.endswith("truncate"):
        return torch.clamp(ratio, min=clip_min, max=clip_max)
    low = clip_min if clip_min is not None else float("-inf")
    high = clip_max if clip_max is not None else float("inf")
    return ratio.masked_fill((ratio < low) | (ratio > high), 0.0)
