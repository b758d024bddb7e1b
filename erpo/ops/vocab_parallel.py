"""The fused ops on a vocabulary sharded across the ranks of a process group (tensor-parallel LM heads).

Each rank holds a contiguous slice of the vocabulary: logits[..., V_r] (or the head's weight[V_r, H] and
bias[V_r]); rank r's slice starts at the sum of the sizes of ranks < r (uneven slices allowed). Targets are
global ids, identical on every rank, as are the upstream gradients of logp and entropy (the loss after the
op is computed redundantly on each rank, as tensor-parallel models do).

Forward: each rank runs the single-device kernel on its slice, with targets mapped to local ids (a row whose
target lives on another rank gets an id outside [0, V_r): the kernels then skip its one-hot term). The
kernel's per-row outputs are a full softmax state of the slice: lse_r, entropy H_r, and the target's logit
(logp_r + lse_r) on the rank that holds it. ONE collective merges them: an all_gather of the [N, 4] states
(lse_r, H_r, target logit, holds-the-target flag) and a local merge on every rank: each slice is the
row_stats state (m, d, w) = (lse_r, 1, -H_r), merged as any two parts of a row are (row_stats.py), so
    lse = logsumexp_r lse_r,  w_r = exp(lse_r - lse),  H = sum_r w_r (H_r - log w_r),  logp = x_t / T - lse.
Why all_gather and not all_reduce: an all-reduce (SUM) of e^(x - m) needs a common shift m, i.e. a MAX
all-reduce first (two collectives, two latencies). The all_gather moves world x N x 4 floats (8 ranks x 64k
tokens = 8 MiB) in one collective, and the merge is exact (the same associative merge as the kernels' split
of V).
Backward: dlogits_j = (g_logp (onehot_j - p_j) - g_ent p_j (x_j - E_p[x])) / T needs only the global lse and
H (E_p[x] = lse - H, a global row statistic already merged) and the rank's own logits: no collective for the
logits path, and each rank's gradient shard stays local. The fused head's grad_hidden is a sum over the whole
vocabulary, so it is all-reduced (SUM) across the group: one collective in its backward, and the hidden
states must then be the same on every rank and not also go through a copy-to-tensor-parallel region whose
backward all-reduces again.
Shard offsets come from an all_gather of the shard sizes, done once per (group, local size, device) and
cached (one host read); `vocab_size=` is checked against their sum.
"""
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from erpo.ops import row_stats

STATE_FIELDS = 4  # lse_r, H_r, target logit, holds-the-target flag
_SHARDS: dict = {}  # (group, local vocab, device) -> (offset, global vocab)


def shard_offset(local_vocab: int, group, device: torch.device, vocab_size: Optional[int] = None) -> tuple[int, int]:
    """(first global id of this rank's slice, global vocabulary) from an all_gather of the slice sizes."""
    key = (group, local_vocab, str(device))
    if key not in _SHARDS:
        sizes = torch.zeros(dist.get_world_size(group), dtype=torch.int64, device=device)
        mine = torch.tensor([local_vocab], dtype=torch.int64, device=device)
        _all_gather(sizes, mine, group)
        sizes = sizes.tolist()
        rank = dist.get_rank(group)
        _SHARDS[key] = (sum(sizes[:rank]), sum(sizes))
    offset, total = _SHARDS[key]
    if vocab_size is not None and vocab_size != total:
        raise ValueError(f"the vocabulary shards of the process group add up to {total} ids, not vocab_size="
                         f"{vocab_size} (this rank holds {local_vocab} ids from id {offset})")
    return offset, total


def global_vocab(local_vocab: int, process_group, device: torch.device) -> int:
    """The whole vocabulary of a group's slices (for callers that bound target ids, e.g. the losses' batch checks)."""
    check_group(process_group)
    return shard_offset(local_vocab, process_group, device)[1]


def check_group(process_group) -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("process_group= needs an initialized torch.distributed process group "
                           "(torch.distributed.init_process_group)")
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed.ProcessGroup (e.g. dist.group.WORLD or "
                        f"dist.new_group(...)), got {type(process_group).__name__}")


def local_targets(targets: Tensor, offset: int, local_vocab: int, ignore_index: int) -> Tensor:
    """Global ids -> this slice's ids; ids on other ranks become an id outside [0, V_r) that is not
    ignore_index, which the kernels treat as "no target here" (NaN logp, no one-hot gradient)."""
    elsewhere = -1 if ignore_index != -1 else -2
    local = targets.long() - offset
    held = (local >= 0) & (local < local_vocab)
    return torch.where(targets == ignore_index, ignore_index, torch.where(held, local, elsewhere))


def merge(logp_r: Tensor, entropy_r: Tensor, lse_r: Tensor, local: Tensor, local_vocab: int, ignore_index: int,
          group) -> tuple[Tensor, Tensor, Tensor]:
    """All_gather the per-slice softmax states and merge them: (logp, entropy, lse) of the whole vocabulary."""
    held = (local >= 0) & (local < local_vocab)
    # The target's logit x_t / T = logp_r + lse_r (-inf when the whole slice is masked: lse_r = -inf).
    target_x = torch.where(held, torch.where(torch.isneginf(lse_r), lse_r, logp_r + lse_r), torch.zeros_like(lse_r))
    state = torch.stack([lse_r, entropy_r, target_x, held.to(lse_r.dtype)])  # [4, N]: each field contiguous
    world = dist.get_world_size(group)
    states = state.new_empty((world * STATE_FIELDS,) + tuple(state.shape[1:]))  # ranks concatenated on dim 0
    _all_gather(states, state, group)
    lse_all, h_all, x_all, held_all = states.view(world, STATE_FIELDS, -1).unbind(1)  # each [world, N]
    # A slice with NaN/+inf logits poisons the whole row (as on one device); an all -inf slice takes no part.
    logp, entropy, lse = row_stats.finish(row_stats.merge(row_stats.from_finished(lse_all, h_all)), x_all.sum(dim=0))
    # No rank holds the target (an id outside the global vocabulary with check_targets=False): NaN, never 0.
    logp = logp.masked_fill(held_all.sum(dim=0) == 0, float("nan"))
    ignored = local == ignore_index
    return logp.masked_fill(ignored, 0.0), entropy.masked_fill(ignored, 0.0), lse.masked_fill(ignored, 0.0)


def _all_gather(out: Tensor, tensor: Tensor, group) -> None:
    # torch >= 2.13 names the single-tensor all_gather all_gather_single (all_gather_into_tensor is deprecated).
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, tensor, group=group)


def all_reduce_sum(tensor: Tensor, group) -> Tensor:
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor
