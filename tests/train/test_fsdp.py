"""FSDP2 (`erpo train --fsdp`) on CPU with gloo: 2 torchrun processes against one process / against DDP."""
import json
import os
import subprocess
import sys
import types

import pytest
import torch

from erpo.train import distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = {**os.environ, "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def _run(cmd, timeout=400):
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def _rel(a, b) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


@pytest.fixture(scope="module")
def worker_runs(tmp_path_factory):
    """fsdp_worker.py once alone (logits and fused head) and once on 2 sharded ranks (all three modes)."""
    worker = os.path.join(ROOT, "tests", "train", "fsdp_worker.py")
    root = tmp_path_factory.mktemp("fsdp-worker")
    one, two = str(root / "one"), str(root / "two")
    _run([sys.executable, worker, one, "logits", "fused"])
    _run(TORCHRUN + [worker, two, "logits", "fused", "fused-reshard"])
    out = []
    for path in (one, two):
        with open(path + ".json") as f:
            results = json.load(f)
        states = torch.load(path + ".pt")
        out.append({mode: {**r, "state": states[mode]} for mode, r in results.items()})
    return out


# fused: the root's head, which FSDP2 keeps unsharded from the forward to the backward (tied to the embeddings);
# fused-reshard: the root resharded after its forward, so the head is a DTensor that distributed.full_head gathers
@pytest.mark.parametrize("mode, baseline, head_type", [("logits", "logits", None), ("fused", "fused", "Parameter"),
                                                       ("fused-reshard", "fused", "DTensor")])
def test_two_sharded_ranks_take_the_steps_of_one_process_on_the_same_global_batch(worker_runs, mode, baseline,
                                                                                 head_type):
    want, got = worker_runs[0][baseline], worker_runs[1][mode]
    assert want["world"] == 1 and not want["sharded"]
    assert got["world"] == 2 and got["sharded"]  # the model really was fully_shard-ed
    if head_type:  # the head the fused loss read, as the model held it right after the forward
        assert got["head_types"] == [head_type] and want["head_types"] == ["Parameter"]
    assert len(set(round(x, 6) for x in want["losses"])) == len(want["losses"])  # the loss moves with the weights
    for a, b in zip(got["losses"], want["losses"]):
        assert _rel(a, b) < 1e-5
    # The clipped gradient norm catches gradients summed instead of averaged, or never synchronised (AdamW alone
    # would hide a scale); the weights catch a head gradient lost or half-applied (the tied embedding included).
    for a, b in zip(got["norms"], want["norms"]):
        assert _rel(a, b) < 1e-5
    full_one, full_two = want["state"], got["state"]
    assert sorted(full_one) == sorted(full_two)
    for name, value in full_one.items():
        assert full_two[name].shape == value.shape  # the gathered state is the full tensor, not a shard
        assert (full_two[name] - value).abs().max() <= 1e-3 * value.abs().max(), name


def _records(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_erpo_train_fsdp_under_torchrun_starts_like_ddp_and_saves_full_weights(tmp_path):
    """`erpo train --fsdp` end to end on the built-in task. Step 1's rollouts and loss metrics (computed before
    the first update) equal the DDP run's with the same seed. The updates themselves are compared in the test
    above, on one fixed global batch."""
    args = ["-m", "erpo", "train", "--steps", "2", "--prompts-per-step", "2", "--mini-batches", "2", "--group-size", "4",
            "--eval-every", "0", "--save-every", "2", "--threads", "1", "--no-progress", "--no-fused-head"]
    ddp, fsdp = str(tmp_path / "ddp"), str(tmp_path / "fsdp")
    _run(TORCHRUN + args + ["--out-dir", ddp])
    _run(TORCHRUN + args + ["--fsdp", "--out-dir", fsdp])
    want, got = _records(ddp), _records(fsdp)
    assert [r["step"] for r in got] == [1, 2]
    assert all(r["nonfinite"] == 0 and r["n_valid_tokens"] > 0 for r in got)
    for key in ("loss", "entropy", "reward", "n_valid_tokens", "ratio_mean", "response_len"):
        assert abs(got[0][key] - want[0][key]) <= 1e-5 * max(abs(want[0][key]), 1.0), (key, got[0][key], want[0][key])
    from safetensors.torch import load_file

    step = os.path.join("checkpoints", "step_000002", "model", "model.safetensors")
    w_ddp, w_fsdp = load_file(os.path.join(ddp, step)), load_file(os.path.join(fsdp, step))
    assert sorted(w_ddp) == sorted(w_fsdp)  # one entry per tensor (the tied head once), as save_pretrained writes
    for name, value in w_ddp.items():
        assert w_fsdp[name].shape == value.shape and torch.isfinite(w_fsdp[name]).all()  # full tensors, not shards
    saved = torch.load(os.path.join(fsdp, "checkpoints", "step_000002", "trainer_state.pt"), weights_only=False)
    assert saved["world"] == 2 and saved["optimizer"]["state"]  # the gathered (full) optimizer state


@pytest.mark.parametrize("change, message", [
    (dict(world=1), "it needs torchrun with 2 or more processes"),
    (dict(eval_every=10), "add --eval-every 0"),
    (dict(rollout="vllm"), "use --rollout hf"),
    (dict(resume="runs/x"), "resuming an FSDP run"),
])
def test_unsupported_combinations_are_refused_before_anything_runs(change, message):
    cfg = dict(fsdp=True, fused_head=False, eval_every=0, rollout="hf", resume="")
    world = change.pop("world", 2)
    cfg.update(change)
    d = distributed.Dist(0, world, torch.device("cpu"))
    with pytest.raises(ValueError, match="^--fsdp: ") as err:
        distributed.check_fsdp(types.SimpleNamespace(**cfg), d)
    assert message in str(err.value) and "\n" not in str(err.value)
    distributed.check_fsdp(types.SimpleNamespace(**{**cfg, "fsdp": False}), d)  # without --fsdp: nothing refused
