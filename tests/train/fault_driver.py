"""Run `erpo train` with one fault injected, as a subprocess of the fault tests (tests/train/test_faults.py).

    python -m tests.train.fault_driver PHASE STEP -- <erpo train flags>

PHASE is where the process is SIGKILLed during training step STEP (1-based): `rollout` (after sampling),
`backward` (at the first backward pass), `optimizer` (just after the optimizer step), `checkpoint` (in the middle
of writing the step's checkpoint: after its files, before its manifest). `enospc` / `eio` make that checkpoint
write fail with the errno instead (the run must stop cleanly and stay resumable). The hooks wrap erpo's own
functions from outside; erpo has no fault-injection code of its own.
"""
import errno
import os
import signal
import sys

import torch

from erpo import cli
from erpo.train import checkpoint, trainer

KILL_PHASES = ("rollout", "backward", "optimizer", "checkpoint")
ERRNO_PHASES = {"enospc": errno.ENOSPC, "eio": errno.EIO}


def main() -> int:
    phase, step, argv = sys.argv[1], int(sys.argv[2]), sys.argv[sys.argv.index("--") + 1:]
    if phase not in KILL_PHASES and phase not in ERRNO_PHASES:
        raise SystemExit(f"unknown phase {phase!r}")
    current = {"step": 0}

    def fault_here(name: str) -> None:
        if name == phase and current["step"] == step:
            os.kill(os.getpid(), signal.SIGKILL)

    real_train_step = trainer.Trainer.train_step

    def train_step(self):
        current["step"] = self.step + 1
        return real_train_step(self)

    real_rollout = trainer.Trainer.rollout

    def rollout(self):
        out = real_rollout(self)
        fault_here("rollout")
        return out

    real_backward = torch.Tensor.backward

    def backward(self, *args, **kwargs):
        fault_here("backward")
        return real_backward(self, *args, **kwargs)

    real_optimizer_step = torch.optim.AdamW.step

    def optimizer_step(self, *args, **kwargs):
        out = real_optimizer_step(self, *args, **kwargs)
        fault_here("optimizer")
        return out

    real_save = checkpoint.save

    def save(run_dir, saved_step, *args, **kwargs):
        current["step"] = saved_step  # the end-of-run save happens after the last train_step
        return real_save(run_dir, saved_step, *args, **kwargs)

    real_sha256 = checkpoint._sha256

    def sha256(path):  # hashing runs after every file of the checkpoint is written, before the manifest
        fault_here("checkpoint")
        if phase in ERRNO_PHASES and current["step"] == step:
            raise OSError(ERRNO_PHASES[phase], os.strerror(ERRNO_PHASES[phase]), path)
        return real_sha256(path)

    trainer.Trainer.train_step, trainer.Trainer.rollout = train_step, rollout
    torch.Tensor.backward, torch.optim.AdamW.step = backward, optimizer_step
    checkpoint.save, checkpoint._sha256 = save, sha256
    return cli.main(["train", *argv])


if __name__ == "__main__":
    sys.exit(main())
