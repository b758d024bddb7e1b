"""TRL drop-in: `from erpo.integrations.trl import GRPOTrainer` in place of `from trl import GRPOTrainer`.

The subclass keeps TRL's name and arguments, adds `loss_config=` (an `erpo.LossConfig`, for what TRL lacks:
ERPO, Clip-Cov, KL-Cov, REPO, ADAPO, combined controls) and overrides `_compute_loss`, TRL's extension point.
The loss is erpo's: the per-token log-probs and entropy come from erpo's fused head
(`linear_logprobs_and_entropy` on the backbone's hidden states and the model's output embedding, no
[B, L, V] logits; the config's logit soft-capping and scale applied as TRL applies them, and GRPOConfig's
`cast_lm_head_to_fp32` as an fp32 head) or, for a model whose head erpo cannot fuse (not an nn.Linear; a
soft-capped or scaled head over a truncated support), from the model's own logits through
`logprobs_and_entropy`; then `erpo.token_policy_loss` computes the loss.
TRL's `GRPOConfig` is mapped onto a `LossConfig` by `loss_config_from_trl`; a TRL option erpo cannot
honour raises and names the option. Written against TRL 1.16.0 (tests/peers pin it).

Truncated sampling (docs/support.md): GRPOConfig's `top_k`, `top_p` and `min_p` (or the same keys in its
`generation_kwargs`, which override them in TRL) are the sampler's support S. By default (`support_loss=True`) the
loss scores the ratio and the KL over S, and the old and reference log-probs TRL computes in
`_generate_and_score_completions` are scored over the same S (`_get_per_token_logps_and_entropies`, overridden
here), each model's S recomputed from its own logits; `support_loss=False` scores the full vocabulary, as TRL does.
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
from erpo.losses.policy_loss import support_metrics
from erpo.ops.support_config import Support
from erpo.ops.linear_logprobs_entropy import head_transform_from_config
from erpo.ops.support_logprobs_entropy import support_linear_logprobs_and_entropy, support_logprobs_and_entropy

CONTROLLER_FILE = "erpo_controller_state.json"  # in each checkpoint folder, next to TRL's own files

# TRL 1.16 loss types; each is also an erpo preset with TRL's aggregation (docs/losses.md, "Parity with the peers").
TRL_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
# Loss types TRL normalises by a token count of the whole generation batch (`num_items_in_batch`).
GLOBAL_TOKEN_LOSS_TYPES = ("dapo", "cispo", "vespo")
# Model-config attributes that scale or cap the logits (TRL 1.16 reads the same): erpo's fused head applies them
# (erpo.ops.linear_logprobs_entropy.head_transform_from_config -> softcap=, logit_scale=).
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


SAMPLING_KEYS = ("top_k", "top_p", "min_p")


def trl_support(args) -> Optional[Support]:
    """The truncated support S TRL 1.16's sampler draws from for `args` (a `trl.GRPOConfig`), or None (the whole
    vocabulary). TRL hands `top_k`, `top_p` and `min_p` to transformers' GenerationConfig or to vLLM's
    SamplingParams, and `generation_kwargs` override them in both (grpo_trainer.py __init__, vllm_generation.py)."""
    values = {key: getattr(args, key) for key in SAMPLING_KEYS}
    overrides = args.generation_kwargs or {}
    if isinstance(overrides, str):
        overrides = json.loads(overrides)
    values.update({key: overrides[key] for key in SAMPLING_KEYS if key in overrides})
    top_k, top_p, min_p = values["top_k"], values["top_p"], values["min_p"]
    # TRL's "off" values: top_k 0 (vLLM: 0 or -1), top_p 1, min_p None or 0
    support = Support(top_k=top_k if top_k is not None and top_k > 0 else None,
                      top_p=top_p if top_p is not None and top_p < 1 else None, min_p=min_p or None)
    return None if support.is_full() else support


def _loss_support(args, use_vllm: bool, support_loss: bool) -> Optional[Support]:
    if not support_loss:
        return None
    support = trl_support(args)
    if support is not None and not use_vllm and support.top_p is not None and support.min_p is not None:
        # transformers' generate warps temperature, top-k, top-p, then min-p (GenerationMixin._get_logits_processor);
        # vLLM, whose order erpo.Support follows, min-p before top-k/top-p: with both top-p and min-p the sets differ
        raise ValueError("GRPOConfig sets top_p < 1 with min_p > 0 under transformers generation: transformers applies "
                         "min-p after top-p, vLLM (whose order the loss's support follows) before it, so the sets "
                         "differ; use one of the two, use_vllm=True, or support_loss=False")
    return support


def loss_config_from_trl(args, loss_config: Optional[LossConfig] = None, use_vllm: bool = False,
                         support_loss: bool = True) -> LossConfig:
    """The `LossConfig` that reproduces TRL's loss for `args` (a `trl.GRPOConfig`).

    With `loss_config`, erpo's config is the loss, and TRL's loss options must either keep their defaults or
    agree with it: a TRL option that would change the loss in a way `loss_config` does not raises, naming it.
    What only the trainer knows (temperature, max_completion_length for dr_grpo's normaliser, the vLLM
    importance-sampling correction, the sampler's truncated support S) is taken from `args` either way: with
    `support_loss` (the default) `LossConfig.support` is `trl_support(args)`, and a `loss_config` whose `support`
    says otherwise raises; `support_loss=False` scores the full vocabulary (a `loss_config.support` then raises).
    """
    _refuse_unsupported(args)
    trl_fields = _trl_fields(args)
    rollout = _rollout_fields(args, use_vllm)
    support = _loss_support(args, use_vllm, support_loss)
    if loss_config is None:
        return LossConfig(**trl_fields, **rollout, support=support)
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
    if loss_config.support is not None and loss_config.support != support:
        sampler = (f"support_loss=False" if not support_loss else
                   f"top_k={args.top_k}, top_p={args.top_p}, min_p={args.min_p}"
                   + (f", generation_kwargs={args.generation_kwargs}" if args.generation_kwargs else "")
                   + f" (the sampler's support: {support})")
        conflicts.append(f"{sampler} (loss_config.support={loss_config.support})")
    if conflicts:
        raise ValueError("GRPOConfig sets loss options that loss_config does not: " + "; ".join(conflicts)
                         + ". Set them in loss_config (erpo's config is the loss) or leave them at TRL's defaults")
    changes = dict(rollout)
    changes["temperature"] = args.temperature
    changes["support"] = support
    if loss_config.agg == "seq-mean-token-sum-norm" and loss_config.max_len is None:
        changes["max_len"] = args.max_completion_length
    return loss_config.replace(**changes)


PLAIN_HEAD = {"softcap": None, "logit_scale": 1.0}


def _fusable_head(model) -> bool:
    """A head erpo's fused head computes: an nn.Linear (its soft cap and logit scale come from the config)."""
    return isinstance(model.get_output_embeddings(), torch.nn.Linear)


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

    forward.erpo_hidden_states = True
    model.forward = forward


def full_head(tensor):
    """The whole of an LM head parameter (weight or bias) for the fused head: an FSDP2 DTensor shard is gathered
    (as TRL's fused head does), a plain tensor (DDP, one process, or the head FSDP2 already unsharded for the root
    module's forward) is returned as it is.

    The gather is differentiable, and its backward must know what the gradient of the full head is: each rank's
    is its own batch slice's share, a partial average over the mesh (FSDP averages the other gradients the same
    way). Without grad_placements, `full_tensor`'s backward takes it as replicated and keeps only this rank's rows
    of its own share, with no reduction: a wrong head gradient on every rank (erpo/train/distributed.py
    `full_head`, the same fix; measured there as 0.6 % loss drift after one step; tests/peers/test_trl_fsdp_head.py)."""
    if tensor is None or not hasattr(tensor, "full_tensor"):
        return tensor
    from torch.distributed.tensor import Partial

    return tensor.full_tensor(grad_placements=[Partial("avg")] * len(tensor.placements))


def _unwrapped(accelerator, model):
    model = accelerator.unwrap_model(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class GRPOTrainer(_TRLGRPOTrainer):
    """TRL's GRPOTrainer with erpo's policy loss; same arguments plus `loss_config` (see the module docstring)."""

    def __init__(self, *args, loss_config: Optional[LossConfig] = None, support_loss: bool = True, **kwargs):
        """`support_loss` (erpo's, like `erpo train --no-support-loss`): score the loss and the old/reference
        log-probs over the truncated support GRPOConfig's top_k/top_p/min_p sample from (True, the default), or
        over the full vocabulary as TRL does (False). Without truncation both are the full vocabulary, bit for bit."""
        super().__init__(*args, **kwargs)
        if self.aux_loss_enabled:
            raise ValueError("the model's config sets output_router_logits with router_aux_loss_coef != 0 (MoE "
                             "load-balancing loss): erpo's GRPOTrainer does not add it; set router_aux_loss_coef=0")
        # The loss and its state (the stateful controls' controllers, Clip-Cov's generator seeded with TRL's seed):
        # erpo's PolicyLoss. The controllers step once per optimizer step on the mean entropy of the accumulation
        # window over all processes (TRL's rule for its controller).
        config = loss_config_from_trl(self.args, loss_config, use_vllm=self.use_vllm, support_loss=support_loss)
        self.erpo_loss = PolicyLoss(config.replace(seed=self.args.seed))
        self._erpo_global_tokens = self.loss_config.agg == "token-mean" and self.loss_type in GLOBAL_TOKEN_LOSS_TYPES
        # TRL's _entropy_bonus_enabled: a static coefficient or the adaptive one (which logs policy_loss, entropy_coef)
        self._erpo_entropy_bonus = self.loss_config.entropy_coef != 0 or self.loss_config.entropy_target is not None
        unwrapped = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        # The support the loss and the old/ref log-probs score; None when it keeps the whole vocabulary (top_k >= V):
        # then TRL's and erpo's full-vocabulary paths run, bit for bit
        support = self.loss_config.support
        vocab = unwrapped.get_output_embeddings().weight.shape[0]
        self._erpo_support = None if support is None or support.is_full(vocab) else support
        # The model's soft cap and logit scale, read as TRL reads them; the fused head applies them (over a truncated
        # support it does not yet: such a model then scores its own logits)
        self._erpo_head = head_transform_from_config(unwrapped.config)
        self._erpo_fused_head = _fusable_head(unwrapped) and (self._erpo_head == PLAIN_HEAD
                                                              or self._erpo_support is None)
        # GRPOConfig.cast_lm_head_to_fp32: TRL has cast the head to fp32; the fused head then takes the 16-bit hidden
        # states as they are and upcasts them tile by tile (head_fp32), as TRL's fused head runs that head in fp32
        self._erpo_head_fp32 = bool(getattr(self.args, "cast_lm_head_to_fp32", False))
        if self._erpo_fused_head:
            _add_hidden_states_forward(unwrapped)
        if self.ref_model is not None and self._erpo_support is not None:
            # The reference log-probs over S are computed here, not by TRL's fused head: the same head path as the
            # policy's (the reference is the policy's architecture, but check its head anyway)
            ref = _unwrapped(self.accelerator, self.ref_model)
            if self._erpo_fused_head and _fusable_head(ref):
                _add_hidden_states_forward(ref)
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

    def _per_token_stats(self, model, input_ids, attention_mask, completion_ids, valid, support=None,
                         fused_head=None):
        """(logp, entropy) [B, C] of the completion tokens, differentiable w.r.t. the model; with `support` (an
        erpo.Support), the support op's SupportResult instead (logp and entropy over S and over the full vocabulary,
        |S|, the targets added), from the same pass."""
        n_completion = completion_ids.size(1)
        targets = completion_ids.masked_fill(~valid, -100)
        temperature = self.loss_config.temperature
        if self._erpo_fused_head if fused_head is None else fused_head:
            with self.accelerator.autocast():  # the backbone in the run's mixed precision, as TRL runs it
                hidden = model(input_ids=input_ids, attention_mask=attention_mask, erpo_hidden_states=True)
            hidden = hidden[:, -n_completion - 1:-1]
            head = _unwrapped(self.accelerator, model).get_output_embeddings()
            # FSDP2 DTensor: the head is gathered, as TRL's fused head does (with the gradient placement full_head
            # explains); a plain tensor otherwise
            weight, bias = full_head(head.weight), full_head(head.bias)
            # The head runs outside autocast, on the head's own dtype (fp32 master weights: fp32 logits statistics);
            # with cast_lm_head_to_fp32 the fp32 head takes the hidden states as they are (upcast tile by tile)
            if not self._erpo_head_fp32:
                hidden = hidden.to(weight.dtype)
            if support is not None:
                return support_linear_logprobs_and_entropy(hidden, weight.contiguous(), bias, targets,
                                                           1.0 / temperature, -100, support, None, False)
            return erpo.linear_logprobs_and_entropy(hidden, weight, targets, bias=bias, temperature=temperature,
                                                    head_fp32=self._erpo_head_fp32, **self._erpo_head)
        with self.accelerator.autocast():
            logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                           logits_to_keep=n_completion + 1).logits[:, :-1]
        if support is not None:
            return support_logprobs_and_entropy(logits, targets, 1.0 / temperature, -100, support, None, False)
        return erpo.logprobs_and_entropy(logits, targets, temperature=temperature)

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **multimodal):
        """TRL's old and reference log-probs (and any other caller's): over the sampler's support S when the loss
        scores S, so the ratio and the KL compare log-probs of the same distribution; TRL's own otherwise."""
        support = self._erpo_support
        if support is None:
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss, **multimodal)
        given = sorted(k for k, v in multimodal.items() if v is not None)
        if given or compute_aux_loss:
            raise ValueError(f"erpo's GRPOTrainer scores text-only batches over the sampler's support; got "
                             f"{given + ['compute_aux_loss'] * bool(compute_aux_loss)}")
        # The policy's head path for the policy (and its PEFT reference), the reference model's own otherwise
        patched = getattr(_unwrapped(self.accelerator, model).forward, "erpo_hidden_states", False)
        fused = self._erpo_fused_head and patched
        batch_size = batch_size or input_ids.size(0)
        logps, entropies = [], []
        for start in range(0, input_ids.size(0), batch_size):
            ids, mask = input_ids[start:start + batch_size], attention_mask[start:start + batch_size]
            completion = ids[:, -logits_to_keep:]
            stats = self._per_token_stats(model, ids, mask, completion, mask[:, -logits_to_keep:].bool(),
                                          support=support, fused_head=fused)
            logps.append(stats.logp)
            if compute_entropy:
                entropies.append(stats.full_entropy if self.loss_config.support_entropy == "full" else stats.entropy)
        return torch.cat(logps), torch.cat(entropies) if compute_entropy else None, None

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
        support = self._erpo_support
        stats = self._per_token_stats(model, input_ids, attention_mask, completion_ids, valid, support=support)
        if support is None:
            logp, entropy = stats
        else:
            # The ratio and the KL over S; the entropy terms over support_entropy's distribution (policy_loss's rule)
            logp = stats.logp
            entropy = stats.full_entropy if self.loss_config.support_entropy == "full" else stats.entropy

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
        if support is not None:
            result.metrics.update(support_metrics(stats, valid))
        self._log_erpo_metrics(mode, result.metrics)
        with torch.no_grad():
            self._log_trl_metrics(mode, config, result, logp.detach(), entropy.detach(), batch, inputs)
            if support is not None:
                self._log_support_metrics(mode, stats, batch["mask"].float())
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

    def _log_support_metrics(self, mode: str, stats, mask) -> None:
        """TRL-style keys for the support S, token means over every process's valid tokens (as TRL reduces `entropy`):
        `support/size_mean` (|S|), `support/singleton_frac` (|S| = 1), `support/target_added_frac` (sampled tokens
        outside the S recomputed from the trainer's logits, added to S: a boundary decided differently by the
        sampler), `support/mass_logratio_mean` (logp over S - logp over the vocabulary = -log of S's mass)."""
        values = {"support/size_mean": stats.size, "support/singleton_frac": (stats.size == 1).float(),
                  "support/target_added_frac": (stats.target_added > 0).float(),
                  "support/mass_logratio_mean": (stats.logp - stats.full_logp).detach()}
        sums = torch.stack([torch.where(mask > 0, v.float(), 0.0).sum() for v in values.values()] + [mask.sum()])
        totals = self.accelerator.reduce(sums, reduction="sum")
        for i, key in enumerate(values):
            self._metrics[mode][key].append((totals[i] / totals[-1].clamp(min=1.0)).item())

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
