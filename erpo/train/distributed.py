"""torchrun support through PyTorch DDP: NCCL on GPUs, gloo on CPUs. One process = one rank = one device.

Each rank samples its own slice of the prompts, generates and scores them, and computes the loss on them;
DDP averages the gradients, so every rank takes the same optimizer step. Scalars that steer training
(controller inputs, the non-finite flag) are averaged across ranks so every rank makes the same decision.

FSDP for models that do not fit one GPU: replace `wrap` with `torch.distributed.fsdp.fully_shard` applied to
each decoder layer and then the whole model (FSDP2), and gather a full state dict for checkpoints and for
`generate` (or use the vLLM rollout, which holds its own copy of the weights). See docs/trainer.md.
"""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


@dataclass
class Dist:
    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def setup(device: str) -> Dist:
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but no CUDA device is available")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(0, 1, torch.device("cuda" if use_cuda else "cpu"))
    local = int(os.environ["LOCAL_RANK"])
    if use_cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(dist.get_rank(), world, torch.device(f"cuda:{local}" if use_cuda else "cpu"))


def wrap(model, d: Dist):
    if not d.enabled:
        return model
    return DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)


def mean(values: dict, d: Dist) -> dict:
    """Average a dict of float scalars across ranks (same keys on every rank)."""
    if not d.enabled:
        return values
    keys = sorted(values)
    packed = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=d.device)
    dist.all_reduce(packed)
    return {k: v / d.world for k, v in zip(keys, packed.tolist())}


def gather(obj, d: Dist) -> list:
    if not d.enabled:
        return [obj]
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def cleanup(d: Dist) -> None:
    if d.enabled:
        dist.destroy_process_group()


def extremes(values: dict, d: Dist) -> dict:
    """Min over ranks of the keys ending in '_min', max of the others (same keys on every rank)."""
    if not d.enabled:
        return values
    out = {}
    for key in sorted(values):
        lowest = key.endswith("_min")
        packed = torch.tensor([-values[key] if lowest else values[key]], dtype=torch.float64, device=d.device)
        dist.all_reduce(packed, op=dist.ReduceOp.MAX)
        out[key] = -packed.item() if lowest else packed.item()
    return out
