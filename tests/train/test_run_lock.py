"""One process trains a run directory at a time (a second gets one line naming the holder's PID, a SIGKILLed
holder leaves no stale lock); Ctrl-C names the latest checkpoint and the resume command; the end-of-run summary of
a resumed run covers the whole run; without a terminal, progress comes as plain lines."""
import os
import signal
import subprocess
import sys
import time

from tests.train.test_run_safety import ENV, QUICK, erpo, one_line_error

SLOW = [a for a in QUICK if a != "--no-progress"] + ["--steps", "400"]


def start(run, *extra):
    # SIGINT back to its default before exec: a test run launched in the background (`cmd &` in a script) inherits
    # SIGINT ignored, and Python then never installs its KeyboardInterrupt handler in the child.
    return subprocess.Popen([sys.executable, "-m", "erpo", "train", *SLOW, "--out-dir", run, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for_checkpoint(run, proc, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.isdir(os.path.join(run, "checkpoints")) and any(
                n.startswith("step_") for n in os.listdir(os.path.join(run, "checkpoints"))):
            return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    raise AssertionError("no checkpoint appeared")


def test_a_second_process_is_refused_and_a_killed_holder_leaves_no_lock(tmp_path):
    run = str(tmp_path / "run")
    holder = start(run)
    try:
        wait_for_checkpoint(run, holder)
        with open(os.path.join(run, "metrics.jsonl"), "rb") as handle:
            before = handle.read()
        for args in (["--resume", run], [*QUICK, "--steps", "3", "--out-dir", run, "--overwrite"]):
            refused = erpo("train", *args)
            line = one_line_error(refused)
            assert f"run directory {run!r} is being trained by process {holder.pid}" in line, line
        assert holder.poll() is None  # the holder trains on, its files were not replaced
        with open(os.path.join(run, "metrics.jsonl"), "rb") as handle:
            assert handle.read().startswith(before)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.communicate()
    latest = max(int(n.split("_")[1]) for n in os.listdir(os.path.join(run, "checkpoints")) if n.startswith("step_"))
    resumed = erpo("train", "--resume", run, "--steps", str(latest + 1), "--no-progress")
    assert resumed.returncode == 0, resumed.stderr[-3000:]


def test_ctrl_c_names_the_latest_checkpoint_and_the_resume_command(tmp_path):
    run = str(tmp_path / "run")
    proc = start(run, "--steps", "5000")  # far more than can run before the signal
    wait_for_checkpoint(run, proc)
    assert proc.poll() is None
    proc.send_signal(signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 130, f"{err[-2000:]}\nstdout: {out[-1000:]}"
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert last.startswith("erpo train: error: interrupted at step ") and "the latest checkpoint is " in last, last
    assert last.endswith(f"continue with `erpo train --resume {run}`"), last
    latest = last.split("the latest checkpoint is ")[1].split(";")[0]
    assert os.path.isdir(latest) and latest.startswith(os.path.join(run, "checkpoints", "step_"))


def test_summary_after_resume_covers_the_whole_run_and_progress_lines_without_a_terminal(tmp_path):
    run = str(tmp_path / "run")
    first = erpo("train", *SLOW[:-2], "--steps", "3", "--out-dir", run)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "step 3/3 R " in first.stdout  # stdout is a pipe here: plain progress lines, not a bar
    assert "mean reward: first 3 steps" in first.stdout and "(of 3 steps)" in first.stdout
    resumed = erpo("train", "--resume", run, "--steps", "5")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "(of 5 steps)" in resumed.stdout and "first 5 steps" in resumed.stdout, resumed.stdout[-2000:]
    assert "Loading weights" not in resumed.stderr  # no third-party progress bar over ours
