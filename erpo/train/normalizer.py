"""The loss normalizer of one optimizer step: global over its micro-batches and over the ranks.

A token-mean loss divides by the valid tokens of the whole optimizer step, on every rank together, not by
each micro-batch's own count; the per-response aggregations divide by the step's responses. The counts go
to the loss as `num_items_in_batch` / `num_seqs_in_batch` (TRL's name; erpo.losses divides by them instead
of its local counts), so the micro-batch losses of all ranks add up to the loss of the whole step. DDP
averages gradients over ranks, so each rank's loss is multiplied by the world size to make that average a sum.

Until erpo.losses takes those keys, the same normalisation is applied here as a scale on each micro-batch's
locally normalised loss: (local count of the micro-batch) / (global count of the step) x world.
"""
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

from erpo.losses import batch as loss_batch


def loss_takes_global_counts() -> bool:
    return "num_items_in_batch" in loss_batch.KNOWN_KEYS


def _counts(mask: torch.Tensor, rows: slice) -> torch.Tensor:
    """(valid tokens, responses, responses with a valid token) of the rows, float64."""
    part = mask[rows]
    lengths = part.sum(-1)
    return torch.stack([lengths.sum(), torch.tensor(part.shape[0], device=mask.device),
                        (lengths > 0).sum()]).to(torch.float64)


@dataclass
class Normalizer:
    agg: str
    tokens: torch.Tensor  # 0-d: valid tokens of the step, all ranks
    seqs: torch.Tensor  # 0-d: responses of the step, all ranks
    nonempty: torch.Tensor  # 0-d: responses with a valid token, all ranks
    world: int

    @classmethod
    def of(cls, mask: torch.Tensor, micro_rows: list[slice], agg: str, dist) -> "Normalizer":
        counts = _counts(mask, slice(micro_rows[0].start, micro_rows[-1].stop))
        if dist.enabled:
            torch_dist.all_reduce(counts)
        return cls(agg, counts[0], counts[1], counts[2], dist.world)

    def batch_keys(self) -> dict:
        if not loss_takes_global_counts():
            return {}
        return {"num_items_in_batch": self.tokens, "num_seqs_in_batch": self.seqs}

    def scale(self, mask: torch.Tensor, rows: slice) -> float:
        """What the micro-batch's loss is multiplied by before backward."""
        if loss_takes_global_counts():
            return float(self.world)
        tokens, seqs, nonempty = _counts(mask, rows).tolist()
        if self.agg == "token-mean":
            share = tokens / float(self.tokens)
        elif self.agg == "seq-mean-token-mean":
            share = nonempty / float(self.nonempty)
        else:
            share = seqs / float(self.seqs)
        return share * self.world
