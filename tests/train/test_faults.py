"""Runs survive being killed anywhere and failed checkpoint writes, bitwise (issue 17).

Each fault runs `erpo train` in its own process (tests/train/fault_driver.py): SIGKILL during a rollout, a
backward pass, an optimizer step or a checkpoint write, at a step drawn from the test seed, or a checkpoint
write that fails with ENOSPC / EIO. The run is then resumed with a bare `erpo train --resume RUN` (the saved
config is restored: no flag repeated), and its final weights and every logged metric must equal those of an
uninterrupted run of the same config, bit for bit (timings aside); stray files dropped into the killed run
(one inside its latest checkpoint) must not block or change that resume. Two non-default configs: ERPO with
micro-batches and a reference model, and REPO-R over two PPO epochs (a loss controller whose state must
survive too).
"""
import json
import os
import random
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import RUN_SEED

CONFIGS = {
    "erpo-micro": ["--loss", "erpo", "--micro-batch-groups", "2"],
    # REPO-R's controller moves zeta every step and zeta shapes every token's advantage; two PPO epochs make the
    # second update off-policy, so the restored optimizer/old-logp state is exercised too.
    "repo_r": ["--loss", "repo_r", "--loss-arg", "target_entropy=1.5", "--ppo-epochs", "2"],
}
BASE = ["--steps", "6", "--prompts-per-step", "4", "--group-size", "4", "--sft-warmup-steps", "5", "--save-every", "2",
        "--keep-checkpoints", "2", "--eval-every", "3", "--threads", "1", "--no-progress", "--no-plots"]
TIMING = {"step_time", "tokens_per_s"}
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(args, timeout=300):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=ENV, cwd=ROOT)


def records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as handle:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in handle]


def final_weights(run_dir):
    return load_file(os.path.join(run_dir, "checkpoints", "step_000006", "model", "model.safetensors"))


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """The uninterrupted run of a config, run once per config on first use."""
    done = {}

    def get(name):
        if name not in done:
            out = str(tmp_path_factory.mktemp(f"baseline-{name}") / "run")
            result = run(["-m", "erpo", "train", *BASE, *CONFIGS[name], "--out-dir", out])
            assert result.returncode == 0, result.stderr[-3000:]
            done[name] = out
        return done[name]
    return get


def assert_same_run(run_dir, expected_dir):
    assert records(run_dir) == records(expected_dir)
    got, want = final_weights(run_dir), final_weights(expected_dir)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def add_stray_files(run_dir):
    """What a user or a tool leaves in a run: a note in the latest checkpoint (not in its manifest), a backup
    beside the checkpoints, a file in the run directory. None of them may block or change the resume."""
    root = os.path.join(run_dir, "checkpoints")
    latest = sorted(name for name in os.listdir(root) if name.startswith("step_"))[-1]
    for path in (os.path.join(root, latest, "notes.txt"), os.path.join(root, f"{latest}.bak"),
                 os.path.join(run_dir, ".DS_Store")):
        with open(path, "w") as handle:
            handle.write("not erpo's")


def _faults():
    """(config, phase, step): every phase for ERPO, two for REPO-R; the step is drawn from the run's test seed,
    after the first checkpoint (step 2), so there is always one to resume from."""
    draw = random.Random(RUN_SEED)
    cases = []
    for name, phases in (("erpo-micro", ("rollout", "backward", "optimizer", "checkpoint")),
                         ("repo_r", ("backward", "checkpoint"))):
        for phase in phases:
            cases.append((name, phase, draw.choice((4, 6)) if phase == "checkpoint" else draw.choice((3, 4, 5))))
    return cases


@pytest.mark.parametrize("name,phase,step", _faults())
def test_sigkill_then_resume_is_bitwise_identical(baseline, name, phase, step, tmp_path):
    expected = baseline(name)
    out = str(tmp_path / "run")
    killed = run(["-m", "tests.train.fault_driver", phase, str(step), "--", *BASE, *CONFIGS[name], "--out-dir", out])
    assert killed.returncode == -9, f"{phase}@{step} was not killed: {killed.returncode} {killed.stderr[-2000:]}"
    add_stray_files(out)
    resumed = run(["-m", "erpo", "train", "--resume", out])
    assert resumed.returncode == 0, f"{phase}@{step}: {resumed.stderr[-3000:]}"
    assert "resumed from" in resumed.stderr and "at step" in resumed.stderr
    assert_same_run(out, expected)


@pytest.mark.parametrize("phase", ["enospc", "eio"])
def test_failed_checkpoint_write_stops_cleanly_and_resumes(baseline, phase, tmp_path):
    name = "erpo-micro"
    expected = baseline(name)
    out = str(tmp_path / "run")
    failed = run(["-m", "tests.train.fault_driver", phase, "4", "--", *BASE, *CONFIGS[name], "--out-dir", out])
    assert failed.returncode == 1, failed.stderr[-3000:]
    lines = failed.stderr.strip().splitlines()
    assert lines[-1].startswith("erpo train: error: step 4: writing the checkpoint failed")
    assert "latest intact checkpoint is step 2" in lines[-1] and "Traceback" not in failed.stderr
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["step_000002"]  # no debris of the failed write
    resumed = run(["-m", "erpo", "train", "--resume", out])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(out, expected)
