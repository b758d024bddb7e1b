"""Check a batch and flatten it to [N] tokens (padded [B, L] or packed [N] layout).

Padded: logits [B, L, V]; targets, mask, old_logp (ref_logp, rollout_logp) [B, L]; advantages [B] or
        rewards + group_ids [B].
Packed: logits [N, V]; targets, mask, old_logp (ref_logp, rollout_logp), seq_ids [N] (response index in [0, S),
        nondecreasing: each response's tokens contiguous); advantages [S] or rewards + group_ids [S].
Either layout: num_items_in_batch / num_seqs_in_batch, the valid tokens / responses of the whole optimizer step
(all micro-batches and ranks), a number or a 0-d tensor, when the loss must be normalized globally.
Shape and dtype problems raise at once (no device work). Value problems (NaN rewards, mask not 0/1, a valid
token with the ignore id, ...) are collected into one flag vector and read back with a
single host sync, only when config.check_inputs is True.
"""
import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from erpo.losses.config import LossConfig

IGNORE_INDEX = -100
# Log-probs are <= 0; an engine's rounding (bf16 logits, another kernel) may give a hair above. Anything beyond
# this is not a log-prob (a probability, a sign error) and is refused.
LOGP_SLACK = 1e-3
TOKEN_KEYS = ("targets", "mask", "old_logp", "ref_logp", "rollout_logp")
NORMALIZER_KEYS = ("num_items_in_batch", "num_seqs_in_batch")
# support_ids: [..., K] kept ids per token (replay of the sampler's truncation), read by the stats pass itself
KNOWN_KEYS = {*TOKEN_KEYS, "advantages", "rewards", "group_ids", "seq_ids", "support_ids", *NORMALIZER_KEYS}


@dataclass
class FlatBatch:
    targets: Optional[Tensor]  # same shape as logits[..., 0]; invalid tokens set to IGNORE_INDEX (the op skips
    # them); None when the log-probs arrive already computed (token_policy_loss)
    valid: Tensor  # [N] bool
    seq: Tensor  # [N] long
    n_seqs: int
    padded_len: Optional[int]  # L of the padded layout, None when packed
    old: Tensor  # [N] float, 0 on invalid tokens
    ref: Optional[Tensor]
    rollout: Optional[Tensor]  # [N] the inference engine's log-probs (rollout IS correction), 0 on invalid tokens
    num_items: Optional[Tensor]  # 0-d global counts of the optimizer step (aggregation.token_weights)
    num_seqs: Optional[Tensor]
    advantages: Optional[Tensor]  # [S]
    rewards: Optional[Tensor]  # [S]
    group_ids: Optional[Tensor]  # [S]


def _as_dict(batch) -> dict:
    if isinstance(batch, dict):
        return batch
    if dataclasses.is_dataclass(batch):
        return {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
    raise TypeError(f"batch must be a dict (or a dataclass) of tensors, got {type(batch).__name__}")


def _tensor(batch: dict, key: str, required: bool, why: str = "") -> Optional[Tensor]:
    value = batch.get(key)
    if value is None:
        if required:
            raise ValueError(f"batch is missing {key!r}{why}")
        return None
    if not isinstance(value, Tensor):
        raise TypeError(f"batch[{key!r}] must be a tensor, got {type(value).__name__}")
    return value


def _check_shape(key: str, tensor: Tensor, shape, what: str) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"batch[{key!r}] has shape {tuple(tensor.shape)} but must be {what} {tuple(shape)}")


def _check_float(key: str, tensor: Tensor) -> None:
    if not tensor.dtype.is_floating_point:
        raise TypeError(f"batch[{key!r}] must be a float tensor, got {tensor.dtype}")


def _check_int(key: str, tensor: Tensor) -> None:
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
        raise TypeError(f"batch[{key!r}] must hold integers, got {tensor.dtype}")


def prepare(logits: Tensor, batch, config: LossConfig) -> FlatBatch:
    """The batch of `policy_loss(logits, ...)`: token positions are `logits.shape[:-1]`."""
    if not isinstance(logits, Tensor):
        raise TypeError(f"logits must be a tensor, got {type(logits).__name__}")
    if logits.dim() not in (2, 3):
        raise ValueError(f"logits must be [B, L, V] (padded) or [N, V] (packed), got shape {tuple(logits.shape)}")
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return prepare_tokens(tuple(logits.shape[:-1]), logits.shape[-1], logits.device, compute, batch, config, "logits")


def prepare_tokens(token_shape: tuple, vocab: Optional[int], device: torch.device, compute: torch.dtype, batch,
                   config: LossConfig, source: str) -> FlatBatch:
    """Check and flatten a batch whose token positions have `token_shape` ([B, L] padded or [N] packed).

    `vocab` bounds the target ids (None: log-probs arrive already computed, targets are not needed);
    `compute` is the float dtype of the flat old/ref log-probs; `source` names the tensor the shape came
    from in error messages ("logits", "hidden", "logp").
    """
    batch = _as_dict(batch)
    unknown = set(k for k, v in batch.items() if v is not None) - KNOWN_KEYS
    if unknown:
        raise ValueError(f"batch has unknown keys {sorted(unknown)}; known: {sorted(KNOWN_KEYS)}")
    packed = len(token_shape) == 1
    layout = "packed [N]" if packed else "padded [B, L]"
    where = f"{source}.shape[:-1]" if source != "logp" else "logp.shape"

    targets = _tensor(batch, "targets", vocab is not None)
    mask = _tensor(batch, "mask", True)
    old = _tensor(batch, "old_logp", True)
    ref = _tensor(batch, "ref_logp", False)
    rollout = _tensor(batch, "rollout_logp", False)
    for key, tensor in (("targets", targets), ("mask", mask), ("old_logp", old), ("ref_logp", ref),
                        ("rollout_logp", rollout)):
        if tensor is not None:
            _check_shape(key, tensor, token_shape, f"{where} ({layout}):")
            if tensor.device != device:
                raise ValueError(f"batch[{key!r}] is on {tensor.device} but {source} on {device}")
    if targets is not None:
        _check_int("targets", targets)
    _check_float("old_logp", old)
    for key, tensor in (("ref_logp", ref), ("rollout_logp", rollout)):
        if tensor is not None:
            _check_float(key, tensor)
    if mask.dtype.is_complex:
        raise TypeError(f"batch['mask'] must be bool or 0/1 numbers, got {mask.dtype}")

    advantages = _tensor(batch, "advantages", False)
    rewards = _tensor(batch, "rewards", False)
    group_ids = _tensor(batch, "group_ids", False)
    if advantages is None and rewards is None:
        raise ValueError("batch needs 'advantages' [B], or 'rewards' [B] with 'group_ids' [B]")
    if advantages is not None and rewards is not None:
        raise ValueError("batch has both 'advantages' and 'rewards': give one (advantages win nothing here)")
    if rewards is not None and group_ids is None:
        raise ValueError("batch gives 'rewards' but no 'group_ids': advantages are computed per group")
    if config.needs_groups and group_ids is None:
        raise ValueError("control 'erpo' needs batch['group_ids'] [B]: the entropy gate normalizes within groups")
    if config.needs_ref and ref is None:
        why = []
        if config.kl_coef > 0:
            why.append(f"kl_coef={config.kl_coef} (KL to the reference)")
        if "erpo" in config.controls and config.eta != 0:
            why.append(f"eta={config.eta} (ERPO's progress signal uses ref log-probs; set eta=0 without a reference)")
        raise ValueError(f"batch has no 'ref_logp' but the config needs it: {', '.join(why)}")
    if config.needs_rollout and rollout is None:
        raise ValueError(f"batch has no 'rollout_logp' but the config needs it: rollout_is={config.rollout_is!r} "
                         "corrects for the inference engine's log-probs (e.g. vLLM's)")
    normalizers = [_normalizer(batch, key, device, compute) for key in NORMALIZER_KEYS]

    if packed:
        seq_ids = _tensor(batch, "seq_ids", True, f" (a packed [N] {source} layout needs per-token response ids)")
        _check_shape("seq_ids", seq_ids, token_shape, f"{where} (packed [N]):")
        _check_int("seq_ids", seq_ids)
        seq = seq_ids.to(device=device, dtype=torch.long)
        per_seq = advantages if advantages is not None else rewards
        if per_seq.dim() != 1:
            raise ValueError(f"advantages/rewards must be [S] (one per response), got {tuple(per_seq.shape)}")
        n_seqs = per_seq.shape[0]
        padded_len = None
        if config.agg == "seq-mean-token-sum-norm" and config.max_len is None:
            raise ValueError("agg 'seq-mean-token-sum-norm' on packed sequences needs LossConfig.max_len (L_max)")
    else:
        if batch.get("seq_ids") is not None:
            raise ValueError(f"batch['seq_ids'] is for the packed [N] layout; in the padded [B, L] layout of {source} "
                             "the rows are the responses")
        n_seqs, padded_len = token_shape
        seq = torch.arange(n_seqs, device=device).repeat_interleave(padded_len)

    for key, tensor in (("advantages", advantages), ("rewards", rewards), ("group_ids", group_ids)):
        if tensor is not None:
            _check_shape(key, tensor, (n_seqs,), "one value per response:")
            if tensor.device != device:
                raise ValueError(f"batch[{key!r}] is on {tensor.device} but {source} on {device}")
    if advantages is not None:
        _check_float("advantages", advantages)
    if rewards is not None:
        _check_float("rewards", rewards)
    if group_ids is not None:
        _check_int("group_ids", group_ids)

    flat_mask = mask.reshape(-1)
    valid = flat_mask if flat_mask.dtype == torch.bool else flat_mask != 0
    flat_targets = None if targets is None else targets.reshape(-1)
    if config.check_inputs:
        _check_values(
            vocab, flat_mask, valid, flat_targets, old, ref, rollout, advantages, rewards, seq if packed else None,
            n_seqs, normalizers,
        )
    masked_targets = None
    if targets is not None:
        masked_targets = torch.where(valid, flat_targets, torch.full_like(flat_targets, IGNORE_INDEX)).view(targets.shape)
    zeros = torch.zeros(valid.shape, dtype=compute, device=device)

    def flat(tensor):
        return None if tensor is None else torch.where(valid, tensor.reshape(-1).to(compute), zeros)

    return FlatBatch(
        targets=masked_targets, valid=valid, seq=seq, n_seqs=n_seqs, padded_len=padded_len,
        old=flat(old), ref=flat(ref), rollout=flat(rollout), num_items=normalizers[0], num_seqs=normalizers[1],
        advantages=advantages, rewards=rewards, group_ids=group_ids,
    )


def _normalizer(batch: dict, key: str, device: torch.device, compute: torch.dtype) -> Optional[Tensor]:
    """A global count as a 0-d tensor on the device; a Python number is checked here, a tensor with the values."""
    value = batch.get(key)
    if value is None:
        return None
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.dtype == torch.bool or value.dtype.is_complex:
            raise TypeError(f"batch[{key!r}] must be a positive number or a one-element tensor, got "
                            f"{value.dtype} of shape {tuple(value.shape)}")
        return value.reshape(()).to(device=device, dtype=compute)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"batch[{key!r}] must be a positive number or a one-element tensor, got {type(value).__name__}")
    if not (value > 0 and value < float("inf")):
        raise ValueError(f"batch[{key!r}] must be a positive finite count, got {value}")
    return torch.tensor(float(value), dtype=compute, device=device)


def _check_values(vocab, flat_mask, valid, flat_targets, old, ref, rollout, advantages, rewards, seq, n_seqs,
                  normalizers):
    """All value checks, one host sync."""
    checks = []  # (flag tensor: True = bad, message)
    if flat_mask.dtype != torch.bool:
        checks.append(((flat_mask != 0) & (flat_mask != 1), "batch['mask'] must hold only 0 and 1"))
    if flat_targets is not None:
        checks.append(
            (valid & (flat_targets == IGNORE_INDEX),
             f"batch['targets'] has the ignore id {IGNORE_INDEX} where mask is 1 (mask/targets mismatch)")
        )
    if vocab is not None:
        out_of_range = valid & ((flat_targets < 0) | (flat_targets >= vocab))
        checks.append((out_of_range, f"batch['targets'] has an id outside [0, {vocab}) where mask is 1"))
    checks.append((valid & ~torch.isfinite(old.reshape(-1)), "batch['old_logp'] is NaN or inf on a valid token"))
    checks.append((valid & (old.reshape(-1) > LOGP_SLACK),
                   f"batch['old_logp'] has a value > 0 on a valid token (log-probs are <= 0; slack {LOGP_SLACK})"))
    if ref is not None:
        checks.append((valid & ~torch.isfinite(ref.reshape(-1)), "batch['ref_logp'] is NaN or inf on a valid token"))
        checks.append((valid & (ref.reshape(-1) > LOGP_SLACK),
                       f"batch['ref_logp'] has a value > 0 on a valid token (log-probs are <= 0; slack {LOGP_SLACK})"))
    if rollout is not None:
        # NaN is allowed: a token the engine could not score gets no correction (TRL's rule); inf is not.
        checks.append((valid & torch.isinf(rollout.reshape(-1)), "batch['rollout_logp'] is inf on a valid token"))
        checks.append((valid & (rollout.reshape(-1) > LOGP_SLACK),
                       f"batch['rollout_logp'] has a value > 0 on a valid token (log-probs are <= 0; slack {LOGP_SLACK})"))
    for key, count in zip(NORMALIZER_KEYS, normalizers):
        if count is not None:
            checks.append((~(torch.isfinite(count) & (count > 0)), f"batch[{key!r}] must be a positive finite count"))
    if advantages is not None:
        checks.append((~torch.isfinite(advantages), "batch['advantages'] has NaN or inf"))
    if rewards is not None:
        checks.append((~torch.isfinite(rewards), "batch['rewards'] has NaN or inf"))
    if seq is not None:
        checks.append(((seq < 0) | (seq >= n_seqs), f"batch['seq_ids'] has an id outside [0, {n_seqs})"))
        if seq.numel() > 1:
            unsorted = seq[1:] < seq[:-1]
            checks.append((unsorted, "batch['seq_ids'] must be nondecreasing (each response's tokens contiguous)"))
    flags = torch.stack([flag.any() for flag, _ in checks]).tolist()
    for bad, (_, message) in zip(flags, checks):
        if bad:
            raise ValueError(message)
