"""torchrun support through PyTorch DDP: NCCL on GPUs, gloo on CPUs. One process = one rank = one device.

Each rank samples its own slice of the prompts, generates and scores them, and computes the loss on them;
DDP averages the gradients, so every rank takes the same optimizer step. Scalars that steer training
(controller inputs, the non-finite flag) are averaged across ranks so every rank makes the same decision.

`fsdp=True` (`erpo train --fsdp`) shards parameters, gradients and optimizer state instead (FSDP2,
`torch.distributed.fsdp.fully_shard` on each decoder layer, then on the whole model): see `shard` and the
FSDP section of docs/trainer.md for what it supports.
"""
import contextlib
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


def wrap(model, d: Dist, fsdp: bool = False):
    """DDP (replicated weights), or FSDP2 with fsdp=True. Call it before the optimizer is built: fully_shard
    replaces the parameters with sharded ones, which the optimizer must hold."""
    if fsdp:
        return shard(model, d)
    if not d.enabled:
        return model
    return DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)


def check_fsdp(cfg, d: Dist) -> None:
    """Refuse, before anything runs, the combinations `--fsdp` does not support (docs/trainer.md says why)."""
    if not cfg.fsdp:
        return
    why = []
    if not d.enabled:
        why.append("it needs torchrun with 2 or more processes (one process has nothing to shard over)")
    if cfg.rollout != "hf":
        why.append(f"rollout {cfg.rollout!r} is not supported: its engine loads model.state_dict() after each step, "
                   "which under FSDP holds only this rank's shards (gathering the full weights into every rank's "
                   "engine is not written): use --rollout hf, which generates on the sharded model")
    if why:
        raise ValueError("--fsdp: " + "; ".join(why))


def shard(model, d: Dist):
    """FSDP2: each decoder layer is one all-gather/reduce-scatter unit, the rest (embeddings, final norm, head)
    the root's. Gradients are averaged over the ranks (as DDP does), so a loss averaged per rank gives the
    gradient of the global batch's mean."""
    from torch.distributed.fsdp import fully_shard

    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"--fsdp: cannot find the decoder layers of {type(model).__name__} (model.model.layers)")
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)
    # transformers' own FSDP2 marker: `generate` then keeps every rank stepping until all have finished
    # (synced_gpus), since ranks whose responses end early must still join the others' all-gathers.
    model._is_fsdp_managed_module = True
    return model


def full_head(tensor):
    """The whole of an LM head parameter (weight or bias) for the fused head under FSDP2.

    Strategy (the one TRL 1.16 uses before its chunked head): gather the head once per micro-batch. A DTensor
    shard is all-gathered with `full_tensor()`, differentiably: its backward reduce-scatters the head's gradient
    back onto this rank's shard (averaged over the ranks with the rest of FSDP's gradients). Where FSDP2 has
    already unsharded the head for the model's forward (the root module's parameters stay unsharded from the
    forward to the backward: the embeddings, the final norm and the head, tied or not), the parameter is a plain
    tensor and is returned as it is; its gradient is reduce-scattered by FSDP's own post-backward, like the
    embeddings'. Either way no rank's optimizer ever sees a partial head gradient. The vocabulary-parallel
    alternative (`erpo.linear_policy_loss(process_group=...)` on each rank's row shard, no full head held) is
    not used: FSDP shards by rows of the flattened parameter, which for [V, H] is rows of V, but the shard
    boundaries are FSDP's (padded, uneven), and the full head exists on every rank anyway during the forward."""
    if tensor is None:
        return None
    from torch.distributed.tensor import DTensor, Partial

    if not isinstance(tensor, DTensor):
        return tensor
    # The gradient each rank computes for the full head is its own batch slice's share: a partial average over
    # the mesh (as FSDP averages the other gradients). Without grad_placements, full_tensor's backward would take
    # it as replicated and keep only this rank's rows of its own share: no reduction, a wrong head gradient.
    return tensor.full_tensor(grad_placements=[Partial("avg")] * len(tensor.placements))


def no_sync(model, d: Dist, sync: bool):
    """The context of a micro-batch's backward: DDP skips its all-reduce until the last micro-batch; FSDP2
    reduce-scatters every micro-batch (its gradients stay sharded, so accumulation costs no full-size copy)."""
    if d.enabled and not sync and isinstance(model, DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


def full_model_state(model, d: Dist, fsdp: bool):
    """The full (unsharded) state dict of an FSDP model on CPU, on rank 0 (a collective: every rank calls it);
    None without FSDP (the model itself holds full weights)."""
    if not fsdp:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # One entry per tensor, as save_pretrained writes an unsharded model: a tied head (lm_head = embeddings)
    # comes back under both names, and named_parameters() lists a shared parameter once.
    names = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    return {k: v for k, v in state.items() if k in names}


SHARDED_DIR = "sharded"  # a checkpoint's torch.distributed.checkpoint (DCP) directory: model + optimizer


def _train_state_dicts(model, optimizer):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)  # FQN keys, DTensor shards under FSDP
    return {"model": model_state, "optimizer": optimizer_state}


def save_sharded(model, optimizer, path: str) -> None:
    """Write the model and optimizer state with torch.distributed.checkpoint (a collective: every rank calls it
    with the same `path`, on a filesystem every rank sees): each rank writes its own shards, rank 0 the
    metadata. No rank gathers the full optimizer state. The files are FQN-keyed, so `load_sharded` reads them
    into an FSDP model of any world size or into a plain one (DCP reshards on load)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_train_state_dicts(model, optimizer), checkpoint_id=path)


def load_sharded(model, optimizer, path: str) -> None:
    """Load what `save_sharded` wrote into `model` and `optimizer` (sharded or not; a collective under FSDP)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = _train_state_dicts(model, optimizer)
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


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
        # Every rank is done with every collective before any leaves. The group is then left to the process's exit:
        # gloo's destroy_process_group was seen to hang (about 1 run in 10 of 2 CPU ranks) or abort ("terminate
        # called without an active exception") after a complete run.
        dist.barrier()


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
