"""erpo train with a truncated sampler (--top-k / --top-p / --min-p): the rollouts sample from the truncation and
the loss scores that same support; every sampled token is inside the support the loss recomputes (so sampler and
loss agree), and --no-support-loss scores the full vocabulary."""
import pytest

from erpo.train.config import from_dict
from erpo.train.trainer import Trainer

SMALL = dict(prompts_per_step=4, group_size=4, mini_batches=2, sft_warmup_steps=3, max_new_tokens=4, progress=False,
             plots=False, eval_every=0, save_every=0, threads=1)


@pytest.mark.parametrize("knobs,most", [({"top_k": 3}, 3), ({"top_p": 0.6}, None), ({"min_p": 0.2}, None)])
@pytest.mark.parametrize("fused_head", [True, False])
def test_the_loss_scores_the_support_the_rollouts_sampled_from(tmp_path, knobs, most, fused_head):
    trainer = Trainer(from_dict({**SMALL, **knobs, "fused_head": fused_head, "out_dir": str(tmp_path)}))
    assert trainer.loss_cfg.support is not None
    record, _ = trainer.train_step()
    assert record["support_target_added"] == 0.0  # every sampled token lies in the support the loss recomputed
    assert 1.0 <= record["support_size_mean"] <= (most or 10 ** 6)
    assert abs(record["ratio_mean"] - 1.0) < 0.05  # old log-probs over the same support: near on-policy


def test_no_support_loss_scores_the_full_vocabulary(tmp_path):
    trainer = Trainer(from_dict({**SMALL, "top_k": 3, "support_loss": False, "out_dir": str(tmp_path)}))
    assert trainer.loss_cfg.support is None
    record, _ = trainer.train_step()
    assert "support_size_mean" not in record


@pytest.mark.parametrize("values,message", [({"top_k": -1}, "top_k must be >= 0"), ({"min_p": 1.0}, "min_p in"),
                                            ({"top_p": 0.9, "min_p": 0.1}, "applies min-p after top-p")])
def test_bad_sampler_settings_are_refused(values, message):
    with pytest.raises(ValueError, match=message):
        from_dict({**SMALL, **values})
