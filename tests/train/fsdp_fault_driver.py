"""One torchrun rank of `erpo train --fsdp` with a SIGKILL injected on one rank (tests/train/test_fsdp.py).

    torchrun --nproc-per-node 2 tests/train/fsdp_fault_driver.py PHASE STEP RANK -- <erpo train flags>

The process of rank RANK kills itself with SIGKILL in training step STEP (1-based) at PHASE: `backward` (its
first backward pass of the step: mid-step, the other rank waiting in a collective) or `checkpoint` (after
every rank wrote its DCP shards of the step's checkpoint, before rank 0's manifest and rename). torchrun then
stops the other rank. The hooks wrap erpo's own functions from outside, as tests/train/fault_driver.py does.
"""
import os
import signal
import sys

import torch

from erpo import cli
from erpo.train import distributed, trainer


def main() -> int:
    phase, step, rank = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    argv = sys.argv[sys.argv.index("--") + 1:]
    if phase not in ("backward", "checkpoint"):
        raise SystemExit(f"unknown phase {phase!r}")
    me = int(os.environ["RANK"])
    current = {"step": 0}

    def fault_here(name: str) -> None:
        if name == phase and current["step"] == step and me == rank:
            os.kill(os.getpid(), signal.SIGKILL)

    real_train_step = trainer.Trainer.train_step

    def train_step(self):
        current["step"] = self.step + 1
        return real_train_step(self)

    real_backward = torch.Tensor.backward

    def backward(self, *args, **kwargs):
        fault_here("backward")
        return real_backward(self, *args, **kwargs)

    real_save_sharded = distributed.save_sharded

    def save_sharded(*args, **kwargs):
        real_save_sharded(*args, **kwargs)
        fault_here("checkpoint")

    trainer.Trainer.train_step, torch.Tensor.backward = train_step, backward
    distributed.save_sharded = save_sharded
    return cli.main(["train", *argv])


if __name__ == "__main__":
    sys.exit(main())
