"""verl drop-in: erpo's policy losses in verl's policy-loss registry (written against verl 0.9.1).

Importing this module registers, with `verl.trainer.ppo.core_algos.register_policy_loss`:
- `erpo_<preset>` for every `LossConfig` preset (`erpo_dapo`, `erpo_erpo`, `erpo_kl_cov`, ...): the preset, with
  the verl actor keys that mean the same thing mapped on (`loss_config_from_verl`);
- `erpo`: the `LossConfig` given as a dict under `actor_rollout_ref.actor.policy_loss.erpo` (that key exists when
  `policy_loss._target_` is `erpo.integrations.verl.PolicyLossConfig`, verl's PolicyLossConfig plus `erpo`).

Load it in every worker with `actor_rollout_ref.model.external_lib=erpo.integrations.verl` (or
`VERL_USE_EXTERNAL_MODULES=erpo.integrations.verl`) and choose the loss with
`actor_rollout_ref.actor.policy_loss.loss_mode=erpo_dapo`. verl's loss signature has no entropy: importing
this module also wraps verl's `ppo_loss` (verl.workers.utils.losses, and the worker module that imported it)
so that it hands the per-token entropy verl already computed (`actor_rollout_ref.actor.calculate_entropy=True`)
and the batch's rollout log-probs to erpo's loss through `per_token_entropy`; a config that needs either raises
when it was not handed over.
Config keys: docs/integrations.md.

Truncated sampling (the rollout's top_k / top_p, docs/support.md): verl hands the losses per-token log-probs its
actor already computed, so a loss cannot change the distribution they are scored on. `install_support_logprobs`
makes verl's FSDP engine compute its log-probs (the current, old and reference ones alike) over the sampler's
support S instead (docs/integrations.md says what it covers and what it does not).
"""
import contextlib
import contextvars
import dataclasses
import functools
import sys
from typing import Optional

import torch
from verl.trainer.ppo.core_algos import register_policy_loss
from verl.workers.config import PolicyLossConfig as _VerlPolicyLossConfig

import erpo
from erpo.losses.config import LossConfig, METHODS
from erpo.losses.controllers import make_controller

_ENTROPY: contextvars.ContextVar = contextvars.ContextVar("erpo_verl_entropy", default=None)
_ROLLOUT: contextvars.ContextVar = contextvars.ContextVar("erpo_verl_rollout_log_probs", default=None)
# verl's ppo_loss lives here; the worker modules import it by name, so each holder is patched.
PPO_LOSS_MODULES = ("verl.workers.utils.losses", "verl.workers.engine_workers", "verl.trainer.distillation.losses")


@dataclasses.dataclass
class PolicyLossConfig(_VerlPolicyLossConfig):
    """verl's PolicyLossConfig plus `erpo`: LossConfig fields (a dict) for `loss_mode=erpo` and overrides for
    `erpo_<preset>`. Select it with `actor_rollout_ref.actor.policy_loss._target_=erpo.integrations.verl.PolicyLossConfig`."""

    erpo: dict = dataclasses.field(default_factory=dict)


@contextlib.contextmanager
def per_token_entropy(entropy: Optional[torch.Tensor], rollout_log_probs: Optional[torch.Tensor] = None):
    """Within the block, erpo's registered losses use `entropy` ([B, T], as verl's log_prob) as the per-token entropy
    and `rollout_log_probs` (the inference engine's, same layout) for erpo's rollout correction and off-policy mask."""
    tokens = _ENTROPY.set(entropy), _ROLLOUT.set(rollout_log_probs)
    try:
        yield
    finally:
        _ENTROPY.reset(tokens[0])
        _ROLLOUT.reset(tokens[1])


def _get(config, key, default=None):
    value = config.get(key, default) if hasattr(config, "get") else getattr(config, key, default)
    return default if value is None else value


def loss_config_from_verl(config, preset: Optional[str]) -> LossConfig:
    """The LossConfig of `erpo_<preset>` (or of `erpo` when preset is None) for verl's actor `config`.

    verl keys mapped: clip_ratio_low/high (or clip_ratio) -> eps_low/eps_high, loss_agg_mode -> agg (token-sum:
    token-mean over 1 / dp_size tokens),
    loss_scale_factor -> max_len, tau_pos/tau_neg -> sapo_tau_pos/neg, policy_loss.clip_cov_ratio/lb/ub,
    policy_loss.kl_cov_ratio, policy_loss.ppo_kl_coef -> kl_cov_beta. `policy_loss.erpo` (a dict) wins over all.
    verl's own KL loss (use_kl_loss) and entropy bonus (entropy_coeff) stay verl's: they are added by verl's
    ppo_loss outside the policy loss, so erpo's kl_coef and entropy_coef default to 0 here.
    """
    policy = _get(config, "policy_loss", {})
    clip = _get(config, "clip_ratio", 0.2)
    agg = _agg(_get(config, "loss_agg_mode", "token-mean"))
    fields = dict(
        eps_low=_get(config, "clip_ratio_low", clip), eps_high=_get(config, "clip_ratio_high", clip), agg=agg,
        max_len=_get(config, "loss_scale_factor", None), sapo_tau_pos=_get(config, "tau_pos", 1.0),
        sapo_tau_neg=_get(config, "tau_neg", 1.05), clip_cov_ratio=_get(policy, "clip_cov_ratio", 2e-4),
        clip_cov_lb=_get(policy, "clip_cov_lb", 1.0), clip_cov_ub=_get(policy, "clip_cov_ub", 5.0),
        kl_cov_ratio=_get(policy, "kl_cov_ratio", 2e-4), kl_cov_beta=_get(policy, "ppo_kl_coef", 1.0),
        kl_coef=0.0, entropy_coef=0.0,
    )
    overrides = dict(_get(policy, "erpo", {}) or {})
    for key in ("support", "support_entropy"):
        if key in overrides:
            raise ValueError(f"policy_loss.erpo.{key}: verl's losses receive log-probs its actor already computed, so "
                             "the loss cannot score a support; use erpo.integrations.verl.install_support_logprobs in "
                             "the workers (docs/integrations.md)")
    if preset is None:
        if "method" not in overrides:
            raise ValueError("loss_mode=erpo reads its LossConfig from actor.policy_loss.erpo, which must name a "
                             "method (set policy_loss._target_=erpo.integrations.verl.PolicyLossConfig and "
                             "+actor_rollout_ref.actor.policy_loss.erpo.method=<preset>)")
    else:
        if overrides.get("method", preset) != preset:
            raise ValueError(f"loss_mode=erpo_{preset} but policy_loss.erpo.method={overrides['method']!r}")
        overrides["method"] = preset
    return LossConfig(**{**fields, **overrides})


# verl 0.9.1 agg_loss modes; "token-sum" is erpo's token-mean with num_items_in_batch = 1 / dp_size (see _agg)
VERL_AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def _agg(mode: str) -> str:
    """erpo's aggregation for verl's loss_agg_mode: verl's token-sum (sum over valid tokens x dp_size) is erpo's
    token-mean whose token count is 1 / dp_size (set by _global_normalizers)."""
    if mode not in VERL_AGG_MODES:
        raise ValueError(f"actor.loss_agg_mode={mode!r} has no erpo equivalent (erpo maps {VERL_AGG_MODES})")
    return "token-mean" if mode == "token-sum" else mode


def _sequence_advantages(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """verl's [B, T] advantages as erpo's one advantage per response; refuses token-varying advantages (GAE)."""
    lengths = mask.sum(-1)
    per_seq = (advantages * mask).sum(-1) / lengths.clamp_min(1)
    spread = ((advantages - per_seq[:, None]).abs() * mask).amax() if mask.any() else advantages.new_zeros(())
    scale = 1.0 + per_seq.abs().max()
    if spread > 1e-5 * scale:  # one host sync; verl's own losses sync for their metrics anyway
        raise ValueError("verl passed advantages that vary within a response (a token-level estimator such as GAE); "
                         "erpo's losses take one advantage per response (GRPO-family estimators)")
    return per_seq


def _global_normalizers(config, batch: dict, loss_agg_mode: str) -> None:
    """verl's global_batch_info (dp_size, batch_num_tokens, global_batch_size) as erpo's global normalisers.

    verl's agg_loss multiplies every mode by dp_size (DDP/FSDP average the gradients over ranks): token-mean divides
    the local token sum by batch_num_tokens / dp_size, token-sum by 1 / dp_size."""
    info = _get(config, "global_batch_info", {}) or {}
    dp_size = info.get("dp_size", 1) or 1
    if loss_agg_mode == "token-sum":
        batch["num_items_in_batch"] = torch.tensor(1.0 / dp_size, dtype=torch.float32)
    elif info.get("batch_num_tokens") is not None:
        batch["num_items_in_batch"] = torch.as_tensor(info["batch_num_tokens"], dtype=torch.float32) / dp_size
    if info.get("global_batch_size") is not None:
        batch["num_seqs_in_batch"] = torch.as_tensor(info["global_batch_size"], dtype=torch.float32) / dp_size
    if info.get("loss_scale_factor") is not None:
        batch["max_len"] = info["loss_scale_factor"]


def erpo_policy_loss(preset: Optional[str], old_log_prob, log_prob, advantages, response_mask,
                     loss_agg_mode: str = "token-mean", config=None, rollout_is_weights=None):
    """verl's PolicyLossFn signature -> erpo.token_policy_loss; returns (loss, metrics as floats)."""
    if config is None:
        raise ValueError("erpo's verl losses need verl's actor config (config=None)")
    if rollout_is_weights is not None:
        raise ValueError(
            "verl passed rollout_is_weights (algorithm.rollout_correction.rollout_is is set): erpo applies its own "
            "rollout correction (LossConfig rollout_is, from the rollout log-probs); set "
            "algorithm.rollout_correction.rollout_is=null")
    loss_config = loss_config_from_verl(config, preset)
    if make_controller(loss_config) is not None:
        raise ValueError(
            f"LossConfig(method={loss_config.method!r}, controls={loss_config.controls}, kl_cov_anneal="
            f"{loss_config.kl_cov_anneal!r}, entropy_target={loss_config.entropy_target}) has state stepped once per "
            "optimizer step (REPO-R, ADAPO, KL-Cov annealing, adaptive entropy coefficient), which verl's policy-loss "
            "registry cannot drive: use the stateless form (e.g. repo instead of repo_r)")
    if loss_config.agg != _agg(loss_agg_mode):
        loss_config = loss_config.replace(agg=_agg(loss_agg_mode))
    mask = response_mask.to(log_prob.dtype)
    entropy = _ENTROPY.get()
    needs_entropy = loss_config.needs_entropy  # a stateful entropy_target was refused above
    if needs_entropy and entropy is None:
        raise ValueError(
            f"LossConfig(method={loss_config.method!r}, controls={loss_config.controls}) needs the per-token entropy, "
            "which verl did not compute: set actor_rollout_ref.actor.calculate_entropy=True (and load "
            "erpo.integrations.verl through external_lib or VERL_USE_EXTERNAL_MODULES so its ppo_loss hook runs)")
    batch = {"mask": mask, "old_logp": old_log_prob, "advantages": _sequence_advantages(advantages, mask)}
    rollout = _ROLLOUT.get()
    if loss_config.needs_rollout and rollout is None:
        raise ValueError(
            f"LossConfig(rollout_is={loss_config.rollout_is!r}) needs the rollout log-probs, which verl did not hand "
            "over: set actor_rollout_ref.rollout.calculate_log_probs=True (and load erpo.integrations.verl through "
            "external_lib or VERL_USE_EXTERNAL_MODULES so its ppo_loss hook runs)")
    if rollout is not None and (loss_config.needs_rollout or loss_config.off_policy_mask is not None):
        batch["rollout_logp"] = rollout
    _global_normalizers(config, batch, loss_agg_mode)
    if "max_len" in batch:
        loss_config = loss_config.replace(max_len=int(batch.pop("max_len")))
    result = erpo.token_policy_loss(log_prob, entropy if needs_entropy else None, batch, loss_config)
    metrics = {f"actor/erpo/{name}": float(value) for name, value in result.metrics.items()}
    metrics["actor/pg_clipfrac"] = float(result.metrics.get("clip_frac_high", 0.0))
    metrics["actor/pg_clipfrac_lower"] = float(result.metrics.get("clip_frac_low", 0.0))
    return result.loss, metrics


def _register() -> None:
    for preset in METHODS:
        register_policy_loss(f"erpo_{preset}")(functools.partial(erpo_policy_loss, preset))
    register_policy_loss("erpo")(functools.partial(erpo_policy_loss, None))


def _with_entropy(ppo_loss):
    """verl's ppo_loss, handing model_output["entropy"] (padded like log_prob) to erpo's registered losses."""
    if getattr(ppo_loss, "__erpo_entropy_hook__", False):
        return ppo_loss
    import verl.workers.utils.losses as verl_losses

    @functools.wraps(ppo_loss)
    def hooked(config, model_output, data, *args, **kwargs):
        entropy = model_output.get("entropy", None)
        if entropy is not None:
            entropy = verl_losses.no_padding_2_padding(entropy, data)
        rollout = None
        if "rollout_log_probs" in data.keys():  # padded exactly as ppo_loss pads old_log_probs
            rollout = data.select("rollout_log_probs").to_padded_tensor()["rollout_log_probs"]
        with per_token_entropy(entropy, rollout):
            return ppo_loss(config, model_output, data, *args, **kwargs)

    hooked.__erpo_entropy_hook__ = True
    return hooked


def install_entropy_hook() -> None:
    """Wrap verl's ppo_loss where it is defined and in every loaded module that imported it by name."""
    import verl.workers.utils.losses  # noqa: F401  (the definition; the worker modules import it from here)

    for name in PPO_LOSS_MODULES:
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "ppo_loss"):
            module.ppo_loss = _with_entropy(module.ppo_loss)


# Where verl 0.9.1 computes the actor's, the old and the reference log-probs from the logits (FSDP engine,
# prepare_model_outputs, both padding layouts); the module imports logprobs_from_logits by name.
SUPPORT_LOGPROB_MODULES = ("verl.workers.engine.fsdp.transformer_impl",)


def support_logprobs_from_logits(support):
    """A replacement for verl's `logprobs_from_logits(logits, labels, inplace_backward=True)` that scores each label
    over the sampler's truncated support S (`support`, an erpo.Support: the rollout's top_k / top_p; docs/support.md)
    with erpo's op: log-softmax over S, recomputed from `logits` in vLLM's order, gradients through the logits of S.
    verl passes logits already divided by the rollout temperature, so S is taken on them as they are (T = 1), as
    vLLM takes it after its temperature."""
    if not isinstance(support, erpo.Support):
        raise TypeError(f"support must be an erpo.Support(top_k=, top_p=, min_p=), got {support!r}")

    def logprobs_from_logits(logits, labels, inplace_backward=True):
        logp, _ = erpo.logprobs_and_entropy(logits, labels, support=support)
        return logp

    logprobs_from_logits.__erpo_support__ = support
    return logprobs_from_logits


def install_support_logprobs(support=None, *, top_k: Optional[int] = None, top_p: Optional[float] = None,
                             modules=SUPPORT_LOGPROB_MODULES) -> None:
    """Make verl's FSDP engine compute every log-prob (the actor's, the old and the reference ones) over the
    rollout's truncated support: pass the rollout's `top_k` and `top_p` (verl's `actor_rollout_ref.rollout.top_k`,
    `.top_p`; -1 / 1.0 = off) or an `erpo.Support`. Call it in every worker before the first forward (an
    external_lib module of your own: docs/integrations.md). A support that keeps everything installs nothing."""
    if support is None:
        support = erpo.Support(top_k=top_k if top_k is not None and top_k > 0 else None,
                               top_p=top_p if top_p is not None and top_p < 1 else None)
    elif top_k is not None or top_p is not None:
        raise ValueError("install_support_logprobs takes a support or top_k/top_p, not both")
    if support.is_full():
        return
    replacement = support_logprobs_from_logits(support)
    import importlib

    for name in modules:
        module = importlib.import_module(name)
        if not hasattr(module, "logprobs_from_logits"):
            raise RuntimeError(f"{name} has no logprobs_from_logits: this verl is not the 0.9.1 erpo hooks into")
        module.logprobs_from_logits = replacement


_register()
install_entropy_hook()
