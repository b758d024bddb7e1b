"""A run directory is the unit of truth (issue 17): resume keeps the run's config, nothing is overwritten
without --overwrite, and every user error is one line `erpo <command>: error: ...` with exit code 2."""
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from erpo.cli import build_parser
from erpo.train import config as config_lib

QUICK = ["--prompts-per-step", "2", "--mini-batches", "2", "--group-size", "4", "--sft-warmup-steps", "2", "--save-every", "1",
         "--keep-checkpoints", "0", "--eval-every", "0", "--threads", "1", "--no-progress", "--no-plots"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def erpo(*args, env=None, cwd=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "erpo", *args], capture_output=True, text=True, timeout=timeout,
                          env=env or ENV, cwd=cwd)


def one_line_error(result, command="train", code=2):
    assert result.returncode == code, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith(f"erpo {command}: error: "), result.stderr[-2000:]
    return lines[-1]


def digest(run_dir):
    """Every file of a run and its content hash: a run left untouched has the same digest."""
    out = {}
    for folder, _, names in os.walk(run_dir):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as handle:
                out[os.path.relpath(path, run_dir)] = hashlib.sha256(handle.read()).hexdigest()
    return out


# --- resume restores the saved config (unit level: a checkpoint's train_config.json) -----------------------------
def fake_checkpoint(tmp_path, **saved):
    step_dir = tmp_path / "run" / "checkpoints" / "step_000050"
    step_dir.mkdir(parents=True)
    values = {**config_lib.TrainConfig().to_dict(), **saved}
    (step_dir / "train_config.json").write_text(json.dumps(values))
    return str(tmp_path / "run")


def parse(argv):
    return config_lib.from_args(build_parser().parse_args(["train", *argv]))


def test_resume_restores_the_runs_config(tmp_path):
    run = fake_checkpoint(tmp_path, loss="erpo", steps=150, save_every=50, loss_args={"gamma": 3.0}, lr=1e-4)
    cfg = parse(["--resume", run])
    assert (cfg.loss, cfg.steps, cfg.save_every, cfg.loss_args, cfg.lr) == ("erpo", 150, 50, {"gamma": 3.0}, 1e-4)
    cfg = parse(["--resume", run, "--steps", "300", "--eval-every", "7", "--no-progress", "--loss", "erpo"])
    assert (cfg.steps, cfg.eval_every, cfg.progress, cfg.loss) == (300, 7, False, "erpo")  # same value: allowed


@pytest.mark.parametrize("flags,key,saved,given", [
    (["--loss", "grpo"], "loss", "'erpo'", "'grpo'"),
    (["--lr", "0.1"], "lr", "0.0001", "0.1"),
    (["--loss-arg", "gamma=5"], "loss_args", "{'gamma': 3.0}", "{'gamma': 5}"),
    (["--seed", "3"], "seed", "0", "3"),
])
def test_resume_refuses_a_change_of_what_is_trained(tmp_path, flags, key, saved, given):
    run = fake_checkpoint(tmp_path, loss="erpo", steps=150, loss_args={"gamma": 3.0}, lr=1e-4)
    with pytest.raises(ValueError) as caught:
        parse(["--resume", run, *flags])
    message = str(caught.value)
    assert f"{key} is {saved} in the run but {given} was given" in message and "--model" in message


def test_resume_refuses_steps_change_of_a_decaying_schedule(tmp_path):
    run = fake_checkpoint(tmp_path, lr_schedule="cosine", steps=150)
    with pytest.raises(ValueError, match="steps 150 -> 300 would reshape the run's lr_schedule 'cosine'"):
        parse(["--resume", run, "--steps", "300"])


def test_bools_are_not_numbers_in_config_files(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("temperature: true\n")
    with pytest.raises(ValueError, match="temperature must be a float, got the bool True"):
        parse(["--config", str(path)])


# --- end to end, as a user runs it ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run = str(tmp_path_factory.mktemp("safety") / "run")
    result = erpo("train", *QUICK, "--steps", "2", "--loss", "dapo", "--out-dir", run)
    assert result.returncode == 0, result.stderr[-3000:]
    return run


def test_existing_run_is_refused_then_replaced_only_with_overwrite(finished_run, tmp_path):
    run = str(tmp_path / "copy")
    shutil.copytree(finished_run, run)
    before = digest(run)
    refused = erpo("train", *QUICK, "--steps", "1", "--out-dir", run)
    assert "already holds a run" in one_line_error(refused) and "--overwrite" in refused.stderr
    assert digest(run) == before  # nothing touched: metrics, config, plot, checkpoints
    (tmp_path / "copy" / "mine.txt").write_text("not erpo's")
    replaced = erpo("train", *QUICK, "--steps", "1", "--out-dir", run, "--overwrite")
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["step_000001"]  # the old step_000002 is gone
    with open(os.path.join(run, "metrics.jsonl")) as handle:
        assert [json.loads(line)["step"] for line in handle] == [1]
    assert (tmp_path / "copy" / "mine.txt").read_text() == "not erpo's"  # only erpo's own entries are replaced
    scored = erpo("eval", run)
    assert scored.returncode == 0 and json.loads(scored.stdout)["checkpoint"].endswith("step_000001")


def test_resume_of_a_finished_run_says_so_and_extending_it_trains_more(finished_run, tmp_path):
    run = str(tmp_path / "copy")
    shutil.copytree(finished_run, run)
    before = digest(run)
    again = erpo("train", "--resume", run)
    assert again.returncode == 0 and "already complete" in again.stdout and "step 2 of steps=2" in again.stdout
    assert digest(run) == before
    shorter = erpo("train", "--resume", run, "--steps", "1")
    assert "steps=1 is below the checkpoint's step 2" in one_line_error(shorter)
    changed = erpo("train", "--resume", run, "--loss", "grpo")
    assert "loss is 'dapo' in the run but 'grpo' was given" in one_line_error(changed)
    longer = erpo("train", "--resume", run, "--steps", "3")
    assert longer.returncode == 0, longer.stderr[-3000:]
    assert "resumed from" in longer.stderr and "at step 2 of 3" in longer.stderr
    with open(os.path.join(run, "metrics.jsonl")) as handle:
        assert [json.loads(line)["step"] for line in handle] == [1, 2, 3]
    with open(os.path.join(run, "train_config.json")) as handle:
        saved = json.load(handle)
    assert saved["loss"] == "dapo" and saved["steps"] == 3


def test_resuming_an_earlier_checkpoint_in_place_is_refused(finished_run, tmp_path, capsys):
    run = str(tmp_path / "copy")
    shutil.copytree(finished_run, run)
    before = digest(run)
    earlier = os.path.join(run, "checkpoints", "step_000001")
    refused = in_process(capsys, "train", "--resume", earlier)
    assert "not the run's latest checkpoint (it also has step 2)" in one_line_error(refused)
    assert "--out-dir NEW" in refused.stderr
    both = in_process(capsys, "train", "--resume", run, "--overwrite")
    assert "--overwrite with --resume" in one_line_error(both)
    assert digest(run) == before  # the later checkpoint and the metrics are intact
    branch = str(tmp_path / "branch")
    moved = erpo("train", "--resume", earlier, "--out-dir", branch)
    assert moved.returncode == 0, moved.stderr[-3000:]
    assert sorted(os.listdir(os.path.join(branch, "checkpoints"))) == ["step_000002"]
    assert digest(run) == before


def test_resuming_a_run_that_never_reached_a_checkpoint_says_how_to_restart(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "train_config.json").write_text("{}")
    result = in_process(capsys, "train", "--resume", str(run))
    assert f"start it again with --out-dir {run} --overwrite" in one_line_error(result)


def test_plot_writes_where_it_says(finished_run, tmp_path):
    out = str(tmp_path / "curves")
    result = erpo("plot", finished_run, "--out", out)
    assert result.returncode == 0 and result.stdout.strip() == out + ".png" and os.path.isfile(out + ".png")
    missing = erpo("plot", finished_run, "--out", str(tmp_path / "no" / "such" / "p.png"))
    assert "does not exist" in one_line_error(missing, "plot")
    folder = tmp_path / "plots"
    folder.mkdir()
    for given in (str(folder), str(folder) + os.sep):  # a folder: the plot goes inside it
        into = erpo("plot", finished_run, "--out", given)
        assert into.returncode == 0 and into.stdout.strip() == str(folder / "metrics.png"), into.stderr[-2000:]
    assert os.listdir(folder) == ["metrics.png"] and not os.path.exists(str(folder) + ".png")


def test_bench_runs_from_the_installed_command_anywhere(tmp_path):
    commands = [[sys.executable, "-c", "import sys; from erpo.cli import main; sys.exit(main())"]]
    if shutil.which("erpo"):  # the console script itself, as a user types it, outside the repository
        commands.append([shutil.which("erpo")])
    for command in commands:
        result = subprocess.run([*command, "bench", "--help"], capture_output=True, text=True, timeout=120,
                                cwd=str(tmp_path), env=ENV)
        assert result.returncode == 0, (command, result.stderr[-2000:])
        assert "--quick" in result.stdout


def in_process(capsys, *argv):
    """`erpo ...` in this process (no interpreter start-up): (exit code, stdout, stderr)."""
    from erpo.cli import main

    code = main(list(argv))
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, captured.out, captured.err)


@pytest.mark.parametrize("flags,expected", [
    (["--out-dir", "/etc/passwd/run"], "is not writable"),
    (["--out-dir", "{tmp}/a-file"], "out_dir '{tmp}/a-file' is a file, not a directory"),
    (["--rollout", "vllm"], "needs vLLM, which is not installed"),
    (["--data", "/tmp/erpo-no-such-file.jsonl"], "data file '/tmp/erpo-no-such-file.jsonl' does not exist"),
    (["--data", "{tmp}/bad.jsonl"], "2 bad row(s): line 1: missing field 'answer'; line 2: not valid JSON"),
    (["--data", "{tmp}"], "is a directory but not a saved `datasets` directory"),
    (["--loss", "erpo", "--loss-arg", "gama=5"], "unknown LossConfig key 'gama' (did you mean 'gamma'?)"),
    (["--reward", "exact_matc"], "(did you mean 'exact_match'?)"),
    (["--model", "/nonexistent/model/dir"], "no such local directory"),
    (["--tokenizer", "/some/tokenizer"], "the built-in model has its own character tokenizer"),
    (["--loss", "erpo", "--ref-model", "/nonexistent/ref"], "ref_model: model '/nonexistent/ref': no such local"),
    (["--resume", "/nonexistent/run"], "no such directory"),
    (["--temperature", "0"], "temperature must be > 0"),
])
def test_user_errors_are_one_line(capsys, flags, expected, tmp_path):
    if "vllm" in flags and importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    (tmp_path / "a-file").write_text("")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "1+1="}\nnot json\n')
    flags = [f.replace("{tmp}", str(tmp_path)) for f in flags]
    out = ["--out-dir", str(tmp_path / "new" / "run")] if "--out-dir" not in flags else []
    result = in_process(capsys, "train", *QUICK, "--steps", "1", *out, *flags)
    assert expected.replace("{tmp}", str(tmp_path)) in one_line_error(result)
    assert not os.path.exists(tmp_path / "new")  # a failed start leaves nothing behind (no folder, no vllm_init/)


@pytest.mark.parametrize("argv,expected", [
    (["train", "--lossx", "erpo"], "erpo train: error: unrecognized arguments: --lossx (did you mean --loss?) erpo"),
    (["train", "--grup-size=4"], "erpo train: error: unrecognized arguments: --grup-size=4 (did you mean --group-size?)"),
    (["train", "--temperature", "True"], "erpo train: error: argument --temperature: invalid float value: 'True'"),
    (["eval"], "erpo eval: error: the following arguments are required: checkpoint"),
    (["plot", "a", "b"], "erpo plot: error: unrecognized arguments: b"),
])
def test_flag_errors_are_one_line_without_the_usage_block(capsys, argv, expected):
    from erpo.cli import main

    with pytest.raises(SystemExit) as caught:
        main(argv)
    err = capsys.readouterr().err
    assert caught.value.code == 2 and err.count("\n") == 1 and err.startswith(expected), err


def test_eval_errors_name_the_checkpoint_argument(capsys):
    result = in_process(capsys, "eval", "/nonexistent/run")
    assert one_line_error(result, "eval").endswith("checkpoint '/nonexistent/run': no such directory")
    negative = in_process(capsys, "eval", "/nonexistent/run", "--temperature", "-1")  # refused, not run greedy
    assert "--temperature must be >= 0" in one_line_error(negative, "eval")


def test_model_errors_say_what_was_tried_and_fail_fast(capsys, monkeypatch, tmp_path):
    (tmp_path / "empty").mkdir()
    result = in_process(capsys, "train", *QUICK, "--model", str(tmp_path / "empty"), "--out-dir", str(tmp_path / "a"))
    assert "without config.json: not a saved transformers model" in one_line_error(result)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    offline = in_process(capsys, "train", *QUICK, "--model", "erpo-test/no-such-model", "--out-dir", str(tmp_path / "b"))
    line = one_line_error(offline)
    assert "HF_HUB_OFFLINE" in line and "local Hugging Face cache (not there)" in line
    assert time.perf_counter() - start < 10  # no minute of retries
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1:9")  # nothing listens there: the hub is unreachable
    start = time.perf_counter()
    unreachable = in_process(capsys, "train", *QUICK, "--model", "erpo-test/no-such-model", "--out-dir",
                             str(tmp_path / "c"))
    assert "(unreachable within 3 s)" in one_line_error(unreachable)
    assert time.perf_counter() - start < 10


def test_nan_stop_is_one_line_with_exit_code_1(capsys, tmp_path):
    # One optimizer step per RL step, so the blow-up of step 1's update shows at step 2; the entropy bonus gives
    # step 1 a gradient even when every group's rewards are equal (zero advantages).
    result = in_process(capsys, "train", *QUICK, "--mini-batches", "1", "--steps", "4", "--lr", "1e30",
                        "--loss-arg", "entropy_coef=0.1",
                        "--on-nonfinite", "stop", "--out-dir", str(tmp_path / "run"))
    line = one_line_error(result, code=1)
    assert "step 2: non-finite" in line and "stopping" in line and "--resume" in line
