"""TRL drop-in: `from erpo.integrations.trl import GRPOTrainer` in place of `from trl import GRPOTrainer`.

The subclass keeps TRL's name and arguments, adds `loss_config=` (an `erpo.LossConfig`, for what TRL lacks:
ERPO, Clip-Cov, KL-Cov, REPO, ADAPO, combined controls) and overrides `_compute_loss`, TRL's extension point.
The loss is erpo's: the per-token log-probs and entropy come from erpo's fused head
(`linear_logprobs_and_entropy` on the backbone's hidden states and the model's output embedding, no
[B, L, V] logits) or, for a model whose head erpo cannot fuse (logit soft-capping or scaling), from the
model's own logits through `logprobs_and_entropy`; then `erpo.token_policy_loss` computes the loss.
TRL's `GRPOConfig` is mapped onto a `LossConfig` by `loss_config_from_trl`; a TRL option erpo cannot
honour raises and names the option. Written against TRL 1.16.0 (tests/peers pin it).
"""
import functools
import json
import os
from typing import Optional

import torch
from trl import GRPOTrainer as _TRLGRPOTrainer
from trl.trainer.utils import nanmax, nanmin

import erpo
from erpo.losses.config import LossConfig
from erpo.losses.controllers import AdaptiveEntropyCoef
from erpo.losses.module import PolicyLoss

CONTROLLER_FILE = "erpo_controller_state.json"  # in each checkpoint folder, next to TRL's own files

# TRL 1.16 loss types; each is also an erpo preset with TRL's aggregation (docs/losses.md, "Parity with the peers").
TRL_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
# Loss types TRL normalises by a token count of the whole generation batch (`num_items_in_batch`).
GLOBAL_TOKEN_LOSS_TYPES = ("dapo", "cispo", "vespo")
# Model-config attributes that scale or cap the logits; erpo's fused head applies neither, so such models run
# the loss on the model's own logits.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                    "logits_scaling")


def _trl_fields(args) -> dict:
    """The LossConfig fields TRL's GRPOConfig sets (TRL's own defaults and rules, grpo_trainer.py __init__)."""
    loss_type = args.loss_type
    if loss_type not in TRL_LOSS_TYPES:
        raise ValueError(f"GRPOConfig.loss_type={loss_type!r} has no erpo equivalent (erpo maps {TRL_LOSS_TYPES})")
    eps_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    fields = dict(
        method=loss_type, eps_low=args.epsilon, eps_high=eps_high, kl_coef=float(args.beta), kl_estimator="k3",
        kl_bias_correction=bool(args.use_bias_correction_kl and args.beta != 0),
        is_level=args.importance_sampling_level, delta=args.delta, temperature=args.temperature,
        entropy_coef=float(args.entropy_coef), off_policy_mask=args.off_policy_mask_threshold,
        sapo_tau_pos=args.sapo_temperature_pos, sapo_tau_neg=args.sapo_temperature_neg,
        vespo_k_pos=args.vespo_k_pos, vespo_lambda_pos=args.vespo_lambda_pos, vespo_k_neg=args.vespo_k_neg,
        vespo_lambda_neg=args.vespo_lambda_neg,
    )
    if loss_type == "cispo":
        # TRL's CISPO weight is min(r, epsilon_high) on the raw ratio (not 1 + epsilon_high)
        fields.update(cispo_clip="upper", cispo_max=eps_high)
    if loss_type == "dr_grpo":
        fields["max_len"] = args.max_completion_length
    if args.top_entropy_quantile < 1.0:
        # TRL keeps the tokens whose entropy is >= the (1 - q) quantile: the top q of them, erpo's rho
        fields.update(controls=("high_entropy_mask",), rho=args.top_entropy_quantile)
    if args.use_adaptive_entropy:
        fields.update(entropy_target=args.entropy_target, entropy_coef_min=args.entropy_coef_min,
                      entropy_coef_max=args.entropy_coef_max, entropy_coef_step=args.entropy_coef_delta)
    return fields


def _rollout_fields(args, use_vllm: bool) -> dict:
    if not (use_vllm and args.vllm_importance_sampling_correction):
        return {}
    return dict(rollout_is=args.vllm_importance_sampling_mode, rollout_is_min=args.vllm_importance_sampling_clip_min,
                rollout_is_max=args.vllm_importance_sampling_clip_max)


def _refuse_unsupported(args) -> None:
    if args.use_adaptive_entropy and args.top_entropy_quantile < 1.0:
        raise ValueError(
            "GRPOConfig.use_adaptive_entropy=True with top_entropy_quantile < 1: TRL measures the controller's entropy "
            "on the kept high-entropy tokens only, erpo's controller on every valid token; use one of the two")


def loss_config_from_trl(args, loss_config: Optional[LossConfig] = None, use_vllm: bool = False) -> LossConfig:
    """The `LossConfig` that reproduces TRL's loss for `args` (a `trl.GRPOConfig`).

    With `loss_config`, erpo's config is the loss, and TRL's loss options must either keep their defaults or
    agree with it: a TRL option that would change the loss in a way `loss_config` does not raises, naming it.
    What only the trainer knows (temperature, max_completion_length for dr_grpo's normaliser, the vLLM
    importance-sampling correction) is taken from `args` either way.
    """
    _refuse_unsupported(args)
    trl_fields = _trl_fields(args)
    rollout = _rollout_fields(args, use_vllm)
    if loss_config is None:
        return LossConfig(**trl_fields, **rollout)
    if not isinstance(loss_config, LossConfig):
        raise TypeError(f"loss_config must be an erpo.LossConfig, got {type(loss_config).__name__}")
    conflicts = []
    if args.beta != 0 and args.beta != loss_config.kl_coef:
        conflicts.append(f"beta={args.beta} (loss_config.kl_coef={loss_config.kl_coef})")
    if args.top_entropy_quantile < 1.0 and not (
            "high_entropy_mask" in loss_config.controls and loss_config.rho == args.top_entropy_quantile):
        conflicts.append(f"top_entropy_quantile={args.top_entropy_quantile} (loss_config has no high_entropy_mask "
                         f"with rho={args.top_entropy_quantile})")
    if args.use_adaptive_entropy and loss_config.entropy_target != args.entropy_target:
        conflicts.append(f"use_adaptive_entropy=True with entropy_target={args.entropy_target} "
                         f"(loss_config.entropy_target={loss_config.entropy_target})")
    if args.entropy_coef != 0 and args.entropy_coef != loss_config.entropy_coef:
        conflicts.append(f"entropy_coef={args.entropy_coef} (loss_config.entropy_coef={loss_config.entropy_coef})")
    if args.delta is not None and args.delta != loss_config.delta:
        conflicts.append(f"delta={args.delta} (loss_config.delta={loss_config.delta})")
    if args.off_policy_mask_threshold is not None and args.off_policy_mask_threshold != loss_config.off_policy_mask:
        conflicts.append(f"off_policy_mask_threshold={args.off_policy_mask_threshold} "
                         f"(loss_config.off_policy_mask={loss_config.off_policy_mask})")
    if args.importance_sampling_level != "token" and args.importance_sampling_level != loss_config.is_level:
        conflicts.append(f"importance_sampling_level={args.importance_sampling_level!r} "
                         f"(loss_config.is_level={loss_config.is_level!r})")
    if conflicts:
        raise ValueError("GRPOConfig sets loss options that loss_config does not: " + "; ".join(conflicts)
                         + ". Set them in loss_config (erpo's config is the loss) or leave them at TRL's defaults")
    changes = dict(rollout)
    changes["temperature"] = args.temperature
    if loss_config.agg == "seq-mean-token-sum-norm" and loss_config.max_len is None:
        changes["max_len"] = args.max_completion_length
    return loss_config.replace(**changes)


def _fusable_head(model) -> bool:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for name in LOGIT_TRANSFORMS:
        value = getattr(config, name, None)
        if value is not None and value != 1.0:
            return False
    head = model.get_output_embeddings()
    return isinstance(head, torch.nn.Linear)


def _add_hidden_states_forward(model) -> None:
    """`model(..., erpo_hidden_states=True)` returns the backbone's last hidden state [B, T, H] instead of logits.

    Patched on the instance, as TRL patches its fused head, so a DDP/FSDP wrapper's forward still runs it; the
    backbone is looked up on each call because PEFT and FSDP replace modules after patching.
    """
    inner = model.forward

    @functools.wraps(inner)
    def forward(*args, erpo_hidden_states=False, **kwargs):
        if not erpo_hidden_states:
            return inner(*args, **kwargs)
        kwargs["use_cache"] = False
        return model.base_model(*args, **kwargs).last_hidden_state

    model.forward = forward


class GRPOTrainer(_TRLGRPOTrainer):
    """TRL's GRPOTrainer with erpo's policy loss; same arguments plus `loss_config` (see the module docstring)."""

    def __init__(self, *args, loss_config: Optional[LossConfig] = None, **kwargs):
        super().__init__(*args, **kwargs)
        if self.aux_loss_enabled:
            raise ValueError("the model's config sets output_router_logits with router_aux_loss_coef != 0 (MoE "
                             "load-balancing loss): erpo's GRPOTrainer does not add it; set router_aux_loss_coef=0")
        # The loss and its state (the stateful controls' controllers, Clip-Cov's generator seeded with TRL's seed):
        # erpo's PolicyLoss. The controllers step once per optimizer step on the mean entropy of the accumulation
        # window over all processes (TRL's rule for its controller).
        config = loss_config_from_trl(self.args, loss_config, use_vllm=self.use_vllm)
        self.erpo_loss = PolicyLoss(config.replace(seed=self.args.seed))
        self._erpo_global_tokens = self.loss_config.agg == "token-mean" and self.loss_type in GLOBAL_TOKEN_LOSS_TYPES
        # TRL's _entropy_bonus_enabled: a static coefficient or the adaptive one (which logs policy_loss, entropy_coef)
        self._erpo_entropy_bonus = self.loss_config.entropy_coef != 0 or self.loss_config.entropy_target is not None
        unwrapped = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        self._erpo_fused_head = _fusable_head(unwrapped)
        if self._erpo_fused_head:
            _add_hidden_states_forward(unwrapped)
        self._erpo_window = None  # [sum of entropy, valid tokens] of the current accumulation window

    @property
    def loss_config(self) -> LossConfig:
        return self.erpo_loss.config

    @property
    def erpo_controller(self):
        return self.erpo_loss.controller

    def _generate_and_score_completions(self, inputs):
        """TRL's batch plus `erpo_group_ids` [B]: the prompt group of each completion (TRL's sampler repeats each
        prompt num_generations times, in order, across processes), which travels with the rows through TRL's
        shuffle and split; ERPO's gate normalises the entropy within these groups."""
        output = super()._generate_and_score_completions(inputs)
        local = output["completion_ids"].size(0)
        first = self.accelerator.process_index * local
        output["erpo_group_ids"] = torch.div(torch.arange(first, first + local, device=output["completion_ids"].device),
                                             self.num_generations, rounding_mode="floor")
        return output

    def _per_token_stats(self, model, input_ids, attention_mask, completion_ids, valid):
        """(logp, entropy) [B, C] of the completion tokens, differentiable w.r.t. the model."""
        n_completion = completion_ids.size(1)
        targets = completion_ids.masked_fill(~valid, -100)
        temperature = self.loss_config.temperature
        if self._erpo_fused_head:
            with self.accelerator.autocast():  # the backbone in the run's mixed precision, as TRL runs it
                hidden = model(input_ids=input_ids, attention_mask=attention_mask, erpo_hidden_states=True)
            hidden = hidden[:, -n_completion - 1:-1]
            unwrapped = self.accelerator.unwrap_model(model)
            unwrapped = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
            head = unwrapped.get_output_embeddings()
            weight, bias = head.weight, head.bias
            if hasattr(weight, "full_tensor"):  # FSDP2 DTensor: the head is gathered, as TRL's fused head does
                weight = weight.full_tensor()
                bias = bias.full_tensor() if bias is not None else None
            # The head runs outside autocast, on the head's own dtype (fp32 master weights: fp32 logits statistics)
            hidden = hidden.to(weight.dtype)
            return erpo.linear_logprobs_and_entropy(hidden, weight, targets, bias=bias, temperature=temperature)
        with self.accelerator.autocast():
            logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                           logits_to_keep=n_completion + 1).logits[:, :-1]
        return erpo.logprobs_and_entropy(logits, targets, temperature=temperature)

    def _compute_loss(self, model, inputs):
        unsupported = [k for k in ("pixel_values", "image_grid_thw", "token_type_ids", "mm_token_type_ids")
                       if inputs.get(k) is not None]
        if unsupported:
            raise ValueError(f"erpo's GRPOTrainer takes text-only batches; the batch has {unsupported}")
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        valid = mask.bool()
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        logp, entropy = self._per_token_stats(model, input_ids, attention_mask, completion_ids, valid)

        advantages = inputs["advantages"]
        if advantages.dim() != 1:
            raise ValueError(f"erpo's GRPOTrainer takes one advantage per completion, got shape {tuple(advantages.shape)}")
        old = inputs.get("old_per_token_logps")
        batch = {"mask": mask, "advantages": advantages,
                 "old_logp": logp.detach() if old is None else old}
        if self.loss_config.needs_groups:
            if "erpo_group_ids" not in inputs:
                raise ValueError(f"LossConfig(controls={self.loss_config.controls}) needs each completion's prompt group; "
                                 "the batch has no 'erpo_group_ids' (set by this trainer's _generate_and_score_completions)")
            batch["group_ids"] = inputs["erpo_group_ids"]
        if self.loss_config.kl_coef > 0 or self.loss_config.needs_ref:
            batch["ref_logp"] = inputs["ref_per_token_logps"]
        behaviour = inputs.get("sampling_per_token_logps")
        if self.loss_config.needs_rollout:
            batch["rollout_logp"] = behaviour
        if self.loss_config.off_policy_mask is not None and behaviour is not None:
            batch["rollout_logp"] = behaviour  # TRL's off-policy mask measures the KL to the sampler's log-probs
        mode = "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1
        if self._erpo_global_tokens:
            # TRL: num_items_in_batch spans the generation batch; rescaled to one process's accumulation window
            normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
            batch["num_items_in_batch"] = normalizer
        elif self.loss_config.agg != "token-mean":
            # TRL's per-response means divide by every completion of the micro-batch, empty ones included
            batch["num_seqs_in_batch"] = torch.tensor(float(mask.size(0)), device=mask.device)
        config = self.erpo_loss.current_config()
        # A micro-batch without a valid token (all completions truncated and masked, or all tool output) gives a
        # differentiable 0 and no update, as TRL's own loss does; erpo counts it in erpo/n_empty_batches.
        result = erpo.token_policy_loss(logp, entropy, batch, config, generator=self.erpo_loss.generator_for(logp.device))
        loss = result.loss if self._erpo_global_tokens else result.loss / accumulation
        self._log_erpo_metrics(mode, result.metrics)
        with torch.no_grad():
            self._log_trl_metrics(mode, config, result, logp.detach(), entropy.detach(), batch, inputs)
        if self.erpo_controller is not None and mode == "train":
            self._step_controller(result.metrics)
        if self._erpo_entropy_bonus and mode == "train" and self.accelerator.sync_gradients:
            # TRL logs its entropy coefficient once per optimizer step (after its adaptive update), bonus on or not
            self._metrics[mode]["entropy_coef"].append(self._erpo_entropy_coef())
        return loss

    def _erpo_entropy_coef(self) -> float:
        """The entropy coefficient TRL would log: the adaptive controller's current value (whether or not the bonus
        is applied this step), else the configured one."""
        controllers = getattr(self.erpo_controller, "controllers", [self.erpo_controller])
        for controller in controllers:
            if isinstance(controller, AdaptiveEntropyCoef):
                return float(controller.coef)
        return float(self.loss_config.entropy_coef)

    def _log_trl_metrics(self, mode: str, config: LossConfig, result, logp, entropy, batch: dict, inputs) -> None:
        """The keys TRL 1.16's `_compute_loss` logs for the same configuration, computed as TRL computes them (token
        sums and counts reduced over processes; per-completion extremes gathered): `policy_loss` (the loss without
        the entropy bonus, before gradient-accumulation scaling) when the bonus is on, `kl`, `entropy`, and the clip
        ratios of the objective (`clip_ratio/*` for clip, `cispo_clip_ratio`, `vespo/phi_seq_mean`)."""
        metrics = self._metrics[mode]
        mask = batch["mask"].float()
        if self._erpo_entropy_bonus:
            policy_loss = result.loss.detach()
            if "entropy_bonus" in result.metrics:
                policy_loss = policy_loss + config.entropy_coef * result.metrics["entropy_bonus"]
            metrics["policy_loss"].append(self.accelerator.gather(policy_loss.float().reshape(1)).nanmean().item())
        log_ratio = logp - batch["old_logp"]
        if config.is_level == "sequence":
            coef_1 = torch.exp((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
        else:
            coef_1 = torch.exp(log_ratio)
        advantages = batch["advantages"].unsqueeze(1)

        def masked_seq_mean(x):
            if x.shape[1] == 1:  # sequence level: one value per completion
                return x.squeeze(1)
            return (x * mask).sum(-1) / mask.sum(-1)

        def global_masked_mean(x):
            if x.shape[1] == 1:
                local_sum, local_count = x.sum(), torch.tensor(float(x.shape[0]), device=x.device)
            else:
                local_sum, local_count = (x * mask).sum(), mask.sum().float()
            totals = self.accelerator.reduce(torch.stack([local_sum.float(), local_count.float()]), reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        if config.kl_coef > 0:
            diff = logp - batch["ref_logp"]
            kl = {"k1": diff, "k2": 0.5 * diff * diff, "k3": torch.exp(-diff) + diff - 1}[config.kl_estimator]
            metrics["kl"].append(global_masked_mean(kl * coef_1 if config.kl_bias_correction else kl))
        metrics["entropy"].append(global_masked_mean(entropy))
        if config.objective == "clip":
            low = (coef_1 < 1 - config.eps_low) & (advantages < 0)
            high = (coef_1 > 1 + config.eps_high) & (advantages > 0)
            metrics["clip_ratio/low_mean"].append(global_masked_mean(low.float()))
            metrics["clip_ratio/high_mean"].append(global_masked_mean(high.float()))
            metrics["clip_ratio/region_mean"].append(global_masked_mean((low | high).float()))
            metrics["clip_ratio/low_min"].append(nanmin(self.accelerator.gather(masked_seq_mean(low.float()))).item())
            metrics["clip_ratio/high_max"].append(nanmax(self.accelerator.gather(masked_seq_mean(high.float()))).item())
        elif config.objective == "cispo":
            cap = config.cispo_max if config.cispo_clip == "upper" else 1 + config.eps_high
            metrics["cispo_clip_ratio"].append(global_masked_mean(((coef_1 > cap) & (advantages > 0)).float()))
        elif config.objective == "vespo":
            phi = self.get_gamma_weights(
                advantages=advantages, log_ratio_per_token=log_ratio, mask=mask,
                importance_sampling_ratio=inputs.get("importance_sampling_ratio"), k_pos=config.vespo_k_pos,
                lambda_pos=config.vespo_lambda_pos, k_neg=config.vespo_k_neg, lambda_neg=config.vespo_lambda_neg)
            metrics["vespo/phi_seq_mean"].append(global_masked_mean(phi))

    def _step_controller(self, metrics: dict) -> None:
        n_valid = metrics["n_valid_tokens"].float()
        stats = torch.stack([metrics["entropy"].float() * n_valid, n_valid])
        self._erpo_window = stats if self._erpo_window is None else self._erpo_window + stats
        if not self.accelerator.sync_gradients:
            return
        totals = self.accelerator.reduce(self._erpo_window, reduction="sum")
        self._erpo_window = None
        # A window without a valid token on any process measured no entropy: erpo's controllers keep their state
        # (TRL's would step on an entropy of 0); KL-Cov's annealing still counts the optimizer step.
        self.erpo_loss.step_controller({"n_valid_tokens": totals[1].item(),
                                        "entropy": (totals[0] / totals[1].clamp(min=1.0)).item()})
        applied = self.erpo_loss.current_config()
        for knob in ("entropy_coef", "zeta", "eps_high", "kl_cov_beta"):
            if getattr(applied, knob) != getattr(self.loss_config, knob):
                self._metrics["train"][f"erpo/{knob}"].append(float(getattr(applied, knob)))

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.erpo_controller is not None and self.args.should_save:
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            with open(os.path.join(folder, CONTROLLER_FILE), "w") as f:
                json.dump(self.erpo_controller.state_dict(), f)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if self.erpo_controller is not None and checkpoint is not None:
            path = os.path.join(checkpoint, CONTROLLER_FILE)
            if not os.path.exists(path):
                raise FileNotFoundError(f"resuming from {checkpoint} without {CONTROLLER_FILE}: the state of erpo's "
                                        f"stateful controls ({self.loss_config.controls}) would restart from scratch")
            with open(path) as f:
                self.erpo_controller.load_state_dict(json.load(f))

    def _log_erpo_metrics(self, mode: str, metrics: dict) -> None:
        """erpo's metrics into TRL's logging as `erpo/<name>` (mean over processes). A micro-batch without a valid
        token contributes only its counts (n_valid_tokens, n_empty_batches): its means are not measurements, and
        a step with no valid token on any process logs none, so they never drag the logged averages to 0."""
        empty = bool(metrics["n_empty_batches"])
        for name, value in metrics.items():
            value = value.detach().float().reshape(1)
            if empty and not name.startswith("n_"):
                value = torch.full_like(value, float("nan"))
            value = self.accelerator.gather(value).nanmean().item()  # every process gathers every key
            if value == value:
                self._metrics[mode][f"erpo/{name}"].append(value)
