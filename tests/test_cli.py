"""The `erpo` command as a new user meets it: every --help works, help and argument errors never load torch or
transformers (which is what makes them fast), misspellings get a did-you-mean, and --loss lists every preset."""
import json
import os
import subprocess
import sys

import pytest

from erpo.cli import build_parser, main
from erpo.losses.config import METHODS

HEAVY = ("torch", "transformers", "triton", "matplotlib", "scipy")
PROBE = ("import json, sys; from erpo.cli import main\n"
         "try:\n    code = main({argv!r})\nexcept SystemExit as stop:\n    code = stop.code\n"
         "print(json.dumps({{'code': code, 'heavy': [m for m in {heavy!r} if m in sys.modules]}}), file=sys.stderr)")


def run_cli(argv):
    """erpo's main() in a fresh interpreter: its exit code, the heavy modules it imported, and its output."""
    result = subprocess.run([sys.executable, "-c", PROBE.format(argv=list(argv), heavy=HEAVY)], capture_output=True,
                            text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})
    report = json.loads(result.stderr.strip().splitlines()[-1])
    return report["code"], report["heavy"], result.stdout, result.stderr


@pytest.mark.parametrize("argv", [["--help"], ["-h"], ["train", "--help"], ["compare", "--help"], ["eval", "--help"],
                                  ["plot", "--help"]])
def test_every_help_works_without_loading_torch(argv):
    code, heavy, out, err = run_cli(argv)
    assert code == 0 and "usage: erpo" in out, err[-2000:]
    assert heavy == [], f"`erpo {' '.join(argv)}` imported {heavy}"


def test_bench_help_and_module_help():
    for command in ([sys.executable, "-m", "erpo", "--help"], [sys.executable, "-m", "erpo", "bench", "--help"]):
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0 and "usage:" in result.stdout, result.stderr[-2000:]


@pytest.mark.parametrize("argv,expected", [
    (["train", "--steps", "-5"], "steps must be >= 1, got -5"),
    (["train", "--loss", "ERPO"], "loss 'ERPO' is not a preset (did you mean 'erpo'?)"),
    (["train", "--group-size", "1"], "group_size must be >= 2"),
    (["train", "--lossx", "grpo"], "unrecognized arguments: --lossx (did you mean --loss?)"),
])
def test_argument_errors_are_one_line_without_loading_torch(argv, expected):
    code, heavy, out, err = run_cli(argv)
    lines = [line for line in err.splitlines() if line.strip()][:-1]  # the last line is the probe's report
    assert code == 2 and len(lines) == 1 and expected in lines[0], err
    assert heavy == [], f"`erpo {' '.join(argv)}` imported {heavy} before refusing it"


def test_loss_help_lists_every_preset_of_the_preset_table():
    train = next(a for a in build_parser()._actions if a.dest == "command").choices["train"]
    loss_help = next(a.help for a in train._actions if a.dest == "loss")
    missing = [m for m in METHODS if m not in loss_help]
    assert not missing and len(METHODS) == 18, missing


def test_config_file_keys_of_other_tools_get_our_name(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("learning_rate: 0.001\n")
    (tmp_path / "d.toml").write_text("Group_Size = 4\n")
    assert main(["train", "--config", str(tmp_path / "c.yaml")]) == 2
    assert "unknown config key 'learning_rate' (did you mean 'lr'?)" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "d.toml")]) == 2
    assert "unknown config key 'Group_Size' (did you mean 'group_size'?)" in capsys.readouterr().err


def test_loss_config_names_a_misspelt_field():
    import erpo

    with pytest.raises(TypeError, match=r"unknown field 'mehtod' \(did you mean 'method'\?\)"):
        erpo.LossConfig(mehtod="grpo")
    with pytest.raises(ValueError, match=r"did you mean 'dapo'\?"):
        erpo.LossConfig(method="DAPO")


def test_import_erpo_is_lazy_and_the_names_are_the_functions():
    probe = ("import sys, erpo; lazy = 'torch' not in sys.modules\n"
             "import erpo.losses.policy_loss, erpo.losses.linear_policy_loss\n"
             "from erpo.losses import policy_loss, linear_policy_loss\n"
             "print(lazy, callable(policy_loss), callable(linear_policy_loss), callable(erpo.policy_loss), "
             "erpo.advantages.__name__, sorted(erpo.__all__) == sorted(n for n in dir(erpo) if n in erpo.__all__))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["True", "True", "True", "True", "erpo.losses.advantages", "True"], out.stderr


def test_eval_of_a_run_without_a_checkpoint_says_so_in_eval_terms(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("")  # a run that stopped before its first checkpoint
    assert main(["eval", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "the run has no checkpoint yet" in err and "nothing to load" in err and "continue" not in err, err
