"""The loss normalizer of one optimizer step: global over its micro-batches and over the ranks.

A token-mean loss divides by the valid tokens of the whole optimizer step, on every rank together, not by
each micro-batch's own count; the per-response aggregations divide by the step's responses. The counts go
to the loss as `num_items_in_batch` / `num_seqs_in_batch` (TRL's name; erpo.losses divides by them instead
of its local counts), so the micro-batch losses of all ranks add up to the loss of the whole step. DDP
averages gradients over ranks, so each rank's loss is multiplied by the world size to make that average a sum.
"""
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist


@dataclass
class Normalizer:
    tokens: torch.Tensor  # 0-d: valid tokens of the step, all ranks
    seqs: torch.Tensor  # 0-d: responses of the step, all ranks
    world: int

    @classmethod
    def of(cls, mask: torch.Tensor, micro_rows: list[slice], dist) -> "Normalizer":
        part = mask[micro_rows[0].start : micro_rows[-1].stop]
        counts = torch.stack([part.sum(), torch.tensor(part.shape[0], device=mask.device)]).to(torch.float64)
        if dist.enabled:
            torch_dist.all_reduce(counts)
        # A step with no valid token anywhere (every completion masked) is a zero step: its micro-batch losses
        # are 0 and divide by 1, never by 0.
        return cls(counts[0].clamp_min(1), counts[1].clamp_min(1), dist.world)

    def batch_keys(self) -> dict:
        return {"num_items_in_batch": self.tokens, "num_seqs_in_batch": self.seqs}

    @property
    def loss_scale(self) -> float:
        """What each micro-batch's loss is multiplied by before backward (undoes DDP's average over ranks)."""
        return float(self.world)
