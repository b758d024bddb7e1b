import argparse

import pytest

from erpo.cli import build_parser
from erpo.train import config as config_lib
from erpo.train.config import FIELDS, TrainConfig


def parse(argv):
    return config_lib.from_args(build_parser().parse_args(["train", *argv]))


def test_defaults_are_the_builtin_task():
    cfg = parse([])
    assert cfg == TrainConfig()
    assert cfg.model == "tiny" and cfg.data == "tiny:add1"


def test_flags_override_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("group_size: 4\nlr: 1\nloss: erpo\nloss_args: {gamma: 3.0, eta: 0.0}\n")
    cfg = parse(["--config", str(path), "--group-size", "6", "--loss-arg", "gamma=7"])
    assert cfg.group_size == 6  # flag wins
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)  # YAML int coerced to the float field
    assert cfg.loss == "erpo" and cfg.loss_args == {"gamma": 7, "eta": 0.0}


def test_toml_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('steps = 3\nprogress = false\n[loss_args]\nrho = 0.3\n')
    cfg = parse(["--config", str(path)])
    assert cfg.steps == 3 and cfg.progress is False and cfg.loss_args == {"rho": 0.3}


@pytest.mark.parametrize("suffix,text", [(".yaml", "group_sise: 4\n"), (".toml", "group_sise = 4\n")])
def test_unknown_key_is_named(tmp_path, suffix, text):
    path = tmp_path / f"c{suffix}"
    path.write_text(text)
    with pytest.raises(ValueError, match="unknown config key 'group_sise'.*did you mean 'group_size'"):
        parse(["--config", str(path)])


def test_unknown_flag_is_rejected(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--group-sise", "4"])
    assert "--group-sise" in capsys.readouterr().err


@pytest.mark.parametrize("text,match", [
    ("group_size: many\n", "group_size must be an int"),
    ("group_size: 0\n", "group_size must be >= 1"),
    ("temperature: 0\n", "temperature must be > 0"),
    ("rollout: sglang\n", "rollout must be one of"),
    ("- a\n- b\n", "must hold a mapping"),
    ("a: [\n", "does not parse"),
])
def test_bad_values(tmp_path, text, match):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        parse(["--config", str(path)])


def test_missing_file_and_bad_loss_arg(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        parse(["--config", str(tmp_path / "nope.yaml")])
    with pytest.raises(ValueError, match="key=value"):
        parse(["--loss-arg", "gamma"])


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = capsys.readouterr().out
    for name in FIELDS:
        flag = "--loss-arg" if name == "loss_args" else "--" + name.replace("_", "-")
        assert flag in text, flag


def test_loss_args_reach_loss_config_and_temperature_is_shared():
    from erpo.train.trainer import loss_config

    cfg = parse(["--loss", "erpo", "--loss-arg", "gamma=3", "--temperature", "0.7"])
    loss = loss_config(cfg)
    assert loss.method == "erpo" and loss.gamma == 3.0 and loss.temperature == 0.7
    with pytest.raises(ValueError, match="top-level"):
        loss_config(parse(["--loss-arg", "temperature=2"]))
    with pytest.raises(ValueError, match="loss_args"):
        loss_config(parse(["--loss-arg", "no_such_knob=1"]))
