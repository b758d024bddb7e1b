"""The built-in recipe `--config entropy_trap` (erpo/train/recipes/entropy_trap.yaml): pure RL on the built-in
task from random weights. Here: the name resolves, a typo is named, the run starts from an untrained policy and
trains. Whether a method locks into one-digit answers is a measurement (examples/compare_methods.py), not a
unit test."""
import argparse
import os

from erpo.train.config import add_arguments, from_args
from erpo.train.trainer import Trainer

import pytest

from erpo.train import config as config_lib

CONFIG = "entropy_trap"


def test_recipe_names_resolve_and_a_typo_is_named(tmp_path):
    assert "entropy_trap" in config_lib.recipes()
    values = config_lib.load_file("entropy_trap")
    assert values["sft_warmup_steps"] == 0 and values["max_new_tokens"] == 3
    with pytest.raises(ValueError, match="did you mean 'entropy_trap'"):
        config_lib.load_file("entropy_trp")
    own = tmp_path / "mine.yaml"
    own.write_text("steps: 7\n")
    assert config_lib.load_file(str(own)) == {"steps": 7}  # a path is still a path


def test_entropy_trap_config_trains_from_random_weights(tmp_path):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cfg = from_args(parser.parse_args(["--config", CONFIG, "--steps", "2", "--prompts-per-step", "4",
                                       "--group-size", "4", "--eval-every", "0", "--no-progress", "--no-plots",
                                       "--threads", "1", "--out-dir", str(tmp_path)]))
    assert cfg.sft_warmup_steps == 0 and cfg.data == "tiny:add1" and cfg.mini_batches == 4 and cfg.lr == 1e-3
    trainer = Trainer(cfg)
    before = trainer.run_eval()
    assert before["eval_pass@1"] < 0.05  # random weights: (almost) never right
    history = trainer.train()
    assert [r["step"] for r in history] == [1, 2] and all(r["nonfinite"] == 0 for r in history)
