"""FSDP2 (`erpo train --fsdp`) on CPU with gloo: 2 torchrun processes against one process / against DDP."""
import json
import os
import re
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
    assert result.returncode == 0, "\n".join(l for l in result.stderr.splitlines() if "error" in l.lower())[-3000:] + result.stderr[-1500:]
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


TIMING = {"step_time", "tokens_per_s"}
# The fused head (the default), eval every 2 steps (and before the first), a checkpoint every 2 steps.
TRAIN = ["-m", "erpo", "train", "--steps", "4", "--prompts-per-step", "4", "--mini-batches", "2", "--group-size", "4",
         "--eval-every", "2", "--save-every", "2", "--threads", "1", "--no-progress", "--no-plots"]
FINAL = os.path.join("checkpoints", "step_000004")


def _records(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]


def _weights(run, step_dir=FINAL):
    from safetensors.torch import load_file

    return load_file(os.path.join(run, step_dir, "model", "model.safetensors"))


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """The uninterrupted `erpo train --fsdp` run, 2 gloo ranks, fused head, eval and checkpoints on."""
    out = str(tmp_path_factory.mktemp("fsdp-run") / "run")
    _run(TORCHRUN + TRAIN + ["--fsdp", "--out-dir", out])
    return out


def test_erpo_train_fsdp_with_the_fused_head_starts_like_ddp_and_saves_full_weights(fsdp_run, tmp_path):
    """`erpo train --fsdp` end to end on the built-in task, with the fused head. Step 1's rollouts and loss metrics
    and the eval before training equal the DDP run's with the same seed. The updates themselves are compared in
    the test above, on one fixed global batch."""
    ddp = str(tmp_path / "ddp")
    _run(TORCHRUN + TRAIN + ["--out-dir", ddp])
    want, got = _records(ddp), _records(fsdp_run)
    assert [r["step"] for r in got] == [0, 1, 2, 3, 4]
    assert all(r["nonfinite"] == 0 and r["n_valid_tokens"] > 0 for r in got[1:])
    assert any(r["loss"] != 0 and r["grad_norm"] > 0 for r in got[1:])  # a run that learns something
    assert got[0] == want[0]  # eval before training: every rank generated on the sharded model, rank 0 logged
    for key in ("loss", "entropy", "reward", "n_valid_tokens", "ratio_mean", "response_len"):
        assert abs(got[1][key] - want[1][key]) <= 1e-5 * max(abs(want[1][key]), 1.0), (key, got[1][key], want[1][key])
    w_ddp, w_fsdp = _weights(ddp), _weights(fsdp_run)
    assert sorted(w_ddp) == sorted(w_fsdp)  # one entry per tensor (the tied head once), as save_pretrained writes
    for name, value in w_ddp.items():
        assert w_fsdp[name].shape == value.shape and torch.isfinite(w_fsdp[name]).all()  # full tensors, not shards
    saved = torch.load(os.path.join(fsdp_run, FINAL, "trainer_state.pt"), weights_only=False)
    assert saved["world"] == 2 and saved["optimizer"] is None  # the optimizer state is in the DCP shards
    shards = sorted(os.listdir(os.path.join(fsdp_run, FINAL, distributed.SHARDED_DIR)))
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # one file per rank, no gathered copy
    with open(os.path.join(fsdp_run, FINAL, "MANIFEST.json")) as f:
        assert {"sharded/__0_0.distcp", "sharded/__1_0.distcp", "sharded/.metadata"} <= set(json.load(f)["files"])


def test_eval_under_fsdp_gives_the_one_process_figure(fsdp_run):
    """The pass@1 the FSDP run logged at each eval step is what one process (`erpo eval`) gets from the full
    weights of that step's checkpoint."""
    logged = {r["step"]: r for r in _records(fsdp_run) if "eval_pass@1" in r}
    assert sorted(logged) == [0, 2, 4]
    assert len({logged[s]["eval_pass@1"] for s in (0, 4)}) == 2  # training moved the figure: it is not a constant
    for step in (2, 4):
        result = _run([sys.executable, "-m", "erpo", "eval", os.path.join(fsdp_run, "checkpoints", f"step_{step:06d}")])
        one = json.loads(result.stdout)
        assert one["eval_pass@1"] == logged[step]["eval_pass@1"], step
        assert one["eval_response_len"] == logged[step]["eval_response_len"], step


# (phase, step, rank): a kill mid-step on rank 1 (in its backward, rank 0 waiting in a collective), and one on
# rank 0 in the middle of writing the final checkpoint (every rank's DCP shards written, no manifest yet)
@pytest.mark.parametrize("phase, step, rank", [("backward", 3, 1), ("checkpoint", 4, 0)])
def test_sigkill_on_one_rank_then_resume_is_bitwise_identical(fsdp_run, tmp_path, phase, step, rank):
    out = str(tmp_path / "run")
    driver = os.path.join(ROOT, "tests", "train", "fsdp_fault_driver.py")
    killed = subprocess.run(TORCHRUN + [driver, phase, str(step), str(rank), "--", *TRAIN[3:], "--fsdp",
                                        "--out-dir", out], capture_output=True, text=True, timeout=400, env=ENV,
                            cwd=ROOT)
    # torchrun's report: the chosen rank died of SIGKILL (and took the run down with it)
    assert killed.returncode != 0, killed.stderr[-3000:]
    assert re.search(rf"rank\s*: {rank} \(local_rank: {rank}\)\s*exitcode\s*: -9 ", killed.stderr), killed.stderr[-3000:]
    left = sorted(os.listdir(os.path.join(out, "checkpoints")))
    assert left[-1] == "step_000002" and (phase == "backward" or left[0].startswith(".tmp-step_000004"))
    resumed = _run(TORCHRUN + ["-m", "erpo", "train", "--resume", out])
    assert "resumed from" in resumed.stderr + resumed.stdout
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["step_000002", "step_000004"]  # no temp left
    assert _records(out) == _records(fsdp_run)  # every metric of every step, eval included, bit for bit
    got, want = _weights(out), _weights(fsdp_run)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_fsdp_checkpoint_loads_without_fsdp_and_another_world_size_is_refused(fsdp_run):
    """The DCP shards load into a plain one-process model and optimizer (what a non-FSDP resume reads): the
    weights are those of the checkpoint's model/ and the AdamW state is there. Resuming with 1 process instead of
    2 is refused, naming both."""
    from erpo.train import tiny_task

    path = os.path.join(fsdp_run, FINAL)
    tokenizer = tiny_task.build_tokenizer()
    model = tiny_task.build_model(tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    distributed.load_sharded(model, optimizer, os.path.join(path, distributed.SHARDED_DIR))
    full = _weights(fsdp_run)
    state = model.state_dict()
    assert all(torch.equal(state[name], value) for name, value in full.items())
    assert len(optimizer.state) == len(list(model.parameters()))
    assert all(float(s["step"]) == 8 for s in optimizer.state.values())  # 4 steps x 2 mini-batches
    result = subprocess.run([sys.executable, "-m", "erpo", "train", "--resume", fsdp_run], capture_output=True,
                            text=True, timeout=200, env=ENV, cwd=ROOT)
    assert result.returncode == 2  # erpo's exit status for a refused configuration
    last = result.stderr.strip().splitlines()[-1]
    assert "was written by 2 processes and this run has 1" in last and "torchrun --nproc-per-node 2" in last


@pytest.mark.parametrize("change, message", [
    (dict(world=1), "it needs torchrun with 2 or more processes"),
    (dict(rollout="vllm"), "rollout 'vllm' is not supported: its engine loads model.state_dict() after each step"),
])
def test_unsupported_combinations_are_refused_before_anything_runs(change, message):
    cfg = dict(fsdp=True, fused_head=True, eval_every=10, rollout="hf", resume="runs/x")  # all supported
    world = change.pop("world", 2)
    cfg.update(change)
    d = distributed.Dist(0, world, torch.device("cpu"))
    with pytest.raises(ValueError, match="^--fsdp: ") as err:
        distributed.check_fsdp(types.SimpleNamespace(**cfg), d)
    assert message in str(err.value) and "\n" not in str(err.value)
    distributed.check_fsdp(types.SimpleNamespace(**{**cfg, "fsdp": False}), d)  # without --fsdp: nothing refused


def test_fused_head_eval_and_resume_are_accepted_with_fsdp():
    cfg = types.SimpleNamespace(fsdp=True, fused_head=True, eval_every=10, rollout="hf", resume="runs/x")
    distributed.check_fsdp(cfg, distributed.Dist(0, 2, torch.device("cpu")))


def test_erpo_train_fsdp_with_vllm_rollouts_is_refused_before_anything_is_written(tmp_path):
    out = str(tmp_path / "run")
    result = subprocess.run([sys.executable, "-m", "erpo", "train", "--fsdp", "--rollout", "vllm", "--out-dir", out],
                            capture_output=True, text=True, timeout=200, env=ENV, cwd=ROOT)
    assert result.returncode == 2  # erpo's exit status for a refused configuration
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("erpo train: error: --fsdp: ") and "rollout 'vllm' is not supported" in last
    assert "Traceback" not in result.stderr and not os.path.exists(out)
