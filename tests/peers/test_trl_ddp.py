"""erpo's TRL drop-in (and TRL's own GRPOTrainer, the harness check) on 2 gloo ranks under torchrun: one
optimizer step's parameter update on a fixed global batch equals the one-process run's, fp32, 1e-5 relative.

The ranks are launched with `torchrun --nproc_per_node 2` and `GRPOConfig(use_cpu=True)`: on a CPU machine
`accelerate launch --num_processes 2` falls back to one process (the worker asserts the trainer's accelerator
really sees 2). The step itself is tests/peers/trl_ddp_worker.py: the trainer's `_compute_loss` on this rank's
rows, `accelerator.backward` through the DDP model its accelerator prepared, then SGD; the ranks hold different
numbers of valid tokens, so a "dapo" normalised per rank instead of by the global count would differ."""
import os
import subprocess
import sys

import pytest
import torch

from tests.peers.inputs import assert_close

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = {**os.environ, "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
WORKER = os.path.join(ROOT, "tests", "peers", "trl_ddp_worker.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def _run(cmd):
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=ENV, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.fixture(scope="module")
def updates(trl_grpo, tmp_path_factory):
    root = tmp_path_factory.mktemp("trl-ddp")
    one, two = str(root / "one.pt"), str(root / "two.pt")
    _run([sys.executable, WORKER, one])
    _run(TORCHRUN + [WORKER, two])
    return torch.load(one), torch.load(two)


@pytest.mark.parametrize("trainer", ["erpo", "trl"])
@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_two_gloo_ranks_take_the_one_process_step(updates, trainer, loss_type):
    one, two = (u[f"{trainer}/{loss_type}"] for u in updates)
    assert abs(two["loss"] - one["loss"]) <= 1e-5 * abs(one["loss"])
    assert one["update"].keys() == two["update"].keys()
    moved = [n for n, u in one["update"].items() if u.abs().max() > 0]
    assert "model.embed_tokens.weight" in moved and len(moved) == len(one["update"])  # every parameter, tied head too
    for name, expected in one["update"].items():
        assert_close(two["update"][name], expected, f"{trainer} {loss_type}: update of {name}")
