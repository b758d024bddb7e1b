"""Statistics over segments (groups, responses, buckets) of flat [N] tensors, on the device, fixed shapes.

Every function here works on tensors whose sizes depend only on the batch shape, never on its values:
no `.item()`, `.nonzero()`, `unique()` or boolean indexing, so the loss never waits for the host.
"""
import torch
from torch import Tensor


def dense_ids(ids: Tensor) -> Tensor:
    """Map arbitrary integer ids [S] to 0..(#distinct - 1) [S] (same id -> same slot), without `unique()`."""
    sorted_ids, order = torch.sort(ids, stable=True)
    is_new = torch.ones_like(sorted_ids, dtype=torch.long)
    is_new[1:] = (sorted_ids[1:] != sorted_ids[:-1]).long()
    dense = torch.empty_like(order)
    dense[order] = torch.cumsum(is_new, 0) - 1
    return dense


def segment_sum(values: Tensor, segment: Tensor, n_segments: int) -> Tensor:
    return values.new_zeros(n_segments).index_add_(0, segment, values)


def segment_mean_std(values: Tensor, segment: Tensor, valid: Tensor, n_segments: int):
    """Per-segment mean and population std (unbiased=False) over the valid entries, two passes.

    Returns (mean [n_segments], std [n_segments], count [n_segments]); empty segments give 0, 0, 0.
    Two passes (mean, then squared deviations) so a one-entry segment gets exactly std = 0.
    """
    weight = valid.to(values.dtype)
    count = segment_sum(weight, segment, n_segments)
    safe_values = torch.where(valid, values, torch.zeros_like(values))
    mean = segment_sum(safe_values, segment, n_segments) / count.clamp_min(1)
    deviation = torch.where(valid, values - mean[segment], torch.zeros_like(values))
    var = segment_sum(deviation * deviation, segment, n_segments) / count.clamp_min(1)
    return mean, var.sqrt(), count


def positions_in_segment(valid: Tensor, segment: Tensor, n_segments: int) -> Tensor:
    """Index of each valid token among the valid tokens of its segment (segments contiguous in flat order)."""
    valid_long = valid.long()
    before = torch.cumsum(valid_long, 0) - valid_long  # valid tokens before this one, whole batch
    # The running count is nondecreasing, so its minimum over a contiguous segment is its value at the start.
    start = torch.full((n_segments,), before.numel(), dtype=torch.long, device=valid.device)
    start = start.scatter_reduce(0, segment, before, reduce="amin", include_self=True)
    return before - start[segment]
