"""`erpo train` end to end on the built-in task, as a user runs it: a few tiny steps per run."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

TINY = ["--steps", "6", "--prompts-per-step", "4", "--group-size", "4", "--sft-warmup-steps", "5",
        "--save-every", "2", "--keep-checkpoints", "0", "--eval-every", "3", "--threads", "1", "--no-progress"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def erpo(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "erpo", *args], capture_output=True, text=True, timeout=timeout, env=ENV)


def records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as handle:
        return [json.loads(line) for line in handle]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    run = str(tmp_path_factory.mktemp("full") / "run")
    result = erpo("train", *TINY, "--out-dir", run)
    assert result.returncode == 0, result.stderr[-3000:]
    return run, result


def test_train_smoke(full_run):
    run, result = full_run
    before, *rows = records(run)
    assert before["step"] == 0 and "eval_pass@1" in before and "reward" not in before  # eval before training
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(0 <= r["reward"] <= 1 and r["entropy"] > 0 and r["nonfinite"] == 0 for r in rows)
    assert "eval_pass@1" in rows[2] and "eval_pass@1" in rows[5] and "eval_pass@1" not in rows[0]
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["step_000002", "step_000004", "step_000006"]
    assert os.path.getsize(os.path.join(run, "metrics.png")) > 10_000
    assert "mean reward: first" in result.stdout


def test_eval_and_plot_subcommands(full_run, tmp_path):
    run, _ = full_run
    result = erpo("eval", run)
    assert result.returncode == 0, result.stderr[-3000:]
    scored = json.loads(result.stdout)
    assert scored["checkpoint"].endswith("step_000006") and scored["eval_prompts"] == 100
    assert scored["eval_pass@1"] == records(run)[-1]["eval_pass@1"]  # greedy: the same figure as in training
    out = str(tmp_path / "p.png")
    assert erpo("plot", run, "--out", out).returncode == 0 and os.path.getsize(out) > 10_000


def test_kill_and_resume_gives_the_same_losses(full_run, tmp_path):
    run, _ = full_run
    expected = {r["step"]: r for r in records(run)}
    killed = str(tmp_path / "killed")
    proc = subprocess.Popen([sys.executable, "-m", "erpo", "train", *TINY, "--out-dir", killed],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.time() + 240
    while not os.path.exists(os.path.join(killed, "checkpoints", "step_000002")) and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # Resume from the run directory (its latest checkpoint), as a user would after a crash...
    result = erpo("train", *TINY, "--resume", killed)
    assert result.returncode == 0, result.stderr[-3000:]
    # ...and, whatever step the kill hit, from step 2 explicitly into a fresh directory.
    fresh = str(tmp_path / "from2")
    result = erpo("train", *TINY, "--resume", os.path.join(killed, "checkpoints", "step_000002"), "--out-dir", fresh)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["step"] for r in records(fresh)] == [3, 4, 5, 6]
    for rows in (records(killed), records(fresh)):
        for r in rows:
            for key in ("loss", "reward", "entropy", "grad_norm", "response_len", "eval_pass@1"):
                assert r.get(key) == expected[r["step"]].get(key), (r["step"], key)  # bitwise: same ops, same order
    assert [r["step"] for r in records(killed)] == [0, 1, 2, 3, 4, 5, 6]


def test_corrupt_checkpoint_refused_by_cli(full_run, tmp_path):
    run, _ = full_run
    copy = str(tmp_path / "copy")
    shutil.copytree(run, copy)
    with open(os.path.join(copy, "checkpoints", "step_000006", "trainer_state.pt"), "ab") as handle:
        handle.write(b"garbage")
    result = erpo("train", *TINY, "--resume", copy)
    assert result.returncode == 2 and "corrupt: trainer_state.pt" in result.stderr


def test_config_error_exit_code(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("stepz: 3\n")
    result = erpo("train", "--config", str(path))
    assert result.returncode == 2 and "unknown config key 'stepz'" in result.stderr


def test_torchrun_two_processes_gloo(tmp_path):
    run = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "erpo", "train",
           "--steps", "2", "--prompts-per-step", "2", "--mini-batches", "2", "--group-size", "4", "--sft-warmup-steps", "5",
           "--eval-every", "2", "--save-every", "2", "--threads", "1", "--no-progress", "--out-dir", run]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "world 2" in result.stderr  # the run banner (rank 0, on the console's stderr)
    assert result.stdout.count("mean reward") == 1  # the summary is printed by rank 0 only
    rows = records(run)
    assert [r["step"] for r in rows] == [0, 1, 2] and "eval_pass@1" in rows[-1]
    assert rows[1]["n_valid_tokens"] > 0 and rows[1]["nonfinite"] == 0
    state = os.path.join(run, "checkpoints", "step_000002", "trainer_state.pt")
    import torch

    saved = torch.load(state, weights_only=True)
    assert saved["world"] == 2 and len(saved["rng"]) == 2
    assert not torch.equal(saved["rng"][0]["torch"], saved["rng"][1]["torch"])  # ranks sample differently
