"""The TRL drop-in's FSDP2 head gather (issue 23 follow-up, the bug the lean trainer's FSDP work found): where the
drop-in reads the LM head as an FSDP2 DTensor shard, it gathers it with `full_tensor(grad_placements=
[Partial("avg")])` (erpo.integrations.trl.full_head), so each rank's head gradient is the average of the ranks'
slices' gradients, as FSDP averages the rest. On 2 gloo ranks (tests/peers/trl_fsdp_head_worker.py) the gathered
head's gradient equals that average exactly, and the bare `full_tensor()` the drop-in used before does not (the
check tells the two apart). What this does not run: the drop-in's trainer under accelerate's FSDP2 wrapping."""
import os
import subprocess
import sys

import torch

from tests.peers.inputs import assert_close

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = {**os.environ, "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
WORKER = os.path.join(ROOT, "tests", "peers", "trl_fsdp_head_worker.py")


def test_gathered_head_gradient_is_the_ranks_average(trl_grpo, tmp_path):
    out = str(tmp_path / "grads.pt")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", WORKER, out]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-4000:]
    result = torch.load(out)
    (weight, bias), (expected_weight, expected_bias) = result["full_head"], result["expected"]
    assert_close(weight, expected_weight, "d loss / d head weight", floor=1e-7)
    assert_close(bias, expected_bias, "d loss / d head bias", floor=1e-7)
    bare_weight, _ = result["bare_full_tensor"]
    assert (bare_weight - expected_weight).abs().max() > 1e-3, "the bare full_tensor() gave the average too"
