"""The entropy-trap recipe (examples/configs/entropy_trap.yaml): pure RL on the built-in task from random
weights. Smoke test only: it loads, starts from an untrained policy and trains; whether GRPO locks into
one-digit answers is a measurement (erpo compare over seeds), not a unit test."""
import argparse
import os

from erpo.train.config import add_arguments, from_args
from erpo.train.trainer import Trainer

CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "configs", "entropy_trap.yaml")


def test_entropy_trap_config_trains_from_random_weights(tmp_path):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cfg = from_args(parser.parse_args(["--config", CONFIG, "--steps", "2", "--prompts-per-step", "4",
                                       "--group-size", "4", "--eval-every", "0", "--no-progress", "--no-plots",
                                       "--threads", "1", "--out-dir", str(tmp_path)]))
    assert cfg.sft_warmup_steps == 0 and cfg.data == "tiny:add1" and cfg.mini_batches == 4
    trainer = Trainer(cfg)
    before = trainer.run_eval()
    assert before["eval_pass@1"] < 0.05  # random weights: (almost) never right
    history = trainer.train()
    assert [r["step"] for r in history] == [1, 2] and all(r["nonfinite"] == 0 for r in history)
