"""`erpo train` exposes the composable loss: presets of the peers, objectives and controls given with --loss-arg
(or in a config file), and each control's own metrics in the run's records."""
import argparse

import pytest

from erpo.train.config import add_arguments, from_args
from erpo.train.trainer import Trainer, loss_config

SMALL = dict(prompts_per_step=3, group_size=4, sft_warmup_steps=2, progress=False, plots=False, eval_every=0,
             save_every=0, threads=1)


def parse(argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return from_args(parser.parse_args(argv))


def test_loss_args_compose_objective_and_controls(tmp_path):
    cfg = parse(["--loss", "dapo", "--loss-arg", "is_level=sequence", "--loss-arg", "controls=high_entropy_mask,kl_cov",
                 "--loss-arg", "kl_cov_ratio=0.1", "--out-dir", str(tmp_path)])
    config = loss_config(cfg)
    assert config.is_level == "sequence" and config.controls == ("high_entropy_mask", "kl_cov")
    for key, value in {**SMALL}.items():
        setattr(cfg, key, value)
    record, _ = Trainer(cfg).train_step()
    for metric in ("entropy_mask_frac", "kl_cov_frac", "seq_ratio_mean", "ratio_max"):
        assert metric in record, metric
    assert record["kl_cov_frac"] > 0 and record["entropy_mask_frac"] > 0


@pytest.mark.parametrize("method", ["cispo", "sapo", "gspo", "gmpo", "vespo", "luspo", "gpg", "bnpo"])
def test_every_peer_preset_trains_a_step(tmp_path, method):
    cfg = parse(["--loss", method, "--out-dir", str(tmp_path)])
    for key, value in SMALL.items():
        setattr(cfg, key, value)
    record, _ = Trainer(cfg).train_step()
    assert record["nonfinite"] == 0


def test_a_bad_composition_names_the_field(tmp_path):
    cfg = parse(["--loss", "gmpo", "--loss-arg", "controls=high_entropy_mask", "--out-dir", str(tmp_path)])
    with pytest.raises(ValueError, match="gmpo"):
        loss_config(cfg)
    cfg = parse(["--loss", "dapo", "--loss-arg", "controls=entropy_mask", "--out-dir", str(tmp_path)])
    with pytest.raises(ValueError, match="controls"):
        loss_config(cfg)
