"""One rank of tests/peers/test_trl_fsdp_head.py (torchrun, 2 gloo ranks): the drop-in's FSDP2 head gather
(`erpo.integrations.trl.full_head`) on a head sharded by rows as FSDP2 shards it (a DTensor Shard(0) parameter),
each rank scoring its own batch slice with erpo's fused head; rank 0 saves the head's gradient (the full tensor)
and, computed in-process, the reference: the average over the ranks of each slice's gradient (what FSDP averages).
The same with a bare `full_tensor()` (the drop-in before the fix) is saved too, to show the test tells them apart.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/peers/trl_fsdp_head_worker.py OUT
"""
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

import erpo
from erpo.integrations.trl import full_head

V, H, N = 13, 8, 6  # 13 rows over 2 ranks: an uneven shard


def loss_of(hidden, weight, bias, targets):
    logp, entropy = erpo.linear_logprobs_and_entropy(hidden, weight, targets, bias=bias)
    return -logp.mean() - 0.1 * entropy.mean()


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(V, H, generator=gen), torch.randn(V, generator=gen)
    hidden, targets = torch.randn(world, N, H, generator=gen), torch.randint(0, V, (world, N), generator=gen)
    result = {}
    for name, gather in (("full_head", full_head), ("bare_full_tensor", lambda t: t.full_tensor())):
        w = torch.nn.Parameter(distribute_tensor(weight.clone(), mesh, [Shard(0)]))
        b = torch.nn.Parameter(distribute_tensor(bias.clone(), mesh, [Shard(0)]))
        loss_of(hidden[rank], gather(w), gather(b), targets[rank]).backward()
        result[name] = (w.grad.full_tensor(), b.grad.full_tensor())
    expected_w, expected_b = torch.zeros(V, H), torch.zeros(V)
    for r in range(world):
        w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
        loss_of(hidden[r], w, b, targets[r]).backward()
        expected_w += w.grad / world
        expected_b += b.grad / world
    result["expected"] = (expected_w, expected_b)
    if rank == 0:
        torch.save(result, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
