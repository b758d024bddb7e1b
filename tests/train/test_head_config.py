"""The trainer's fused head takes soft-capped and scaled heads from the model's config (issue 26 item 1): no more
refusal of Gemma-style models; --head-fp32 mirrors TRL's cast_lm_head_to_fp32."""
import types

import pytest
import torch

from erpo.ops.linear_logprobs_entropy import head_transform_from_config
from erpo.train.config import from_dict
from erpo.train.trainer import Trainer, check_plain_head

SMALL = dict(prompts_per_step=3, group_size=4, mini_batches=1, sft_warmup_steps=3, progress=False, plots=False,
             eval_every=0, save_every=0, threads=1, max_new_tokens=4)


def make(tmp_path, **over):
    return Trainer(from_dict({**SMALL, "out_dir": str(tmp_path), **over}))


def test_config_reading_follows_trl():
    from transformers import CohereConfig, Gemma2Config, GraniteConfig, LlamaConfig

    assert head_transform_from_config(LlamaConfig()) == {"softcap": None, "logit_scale": 1.0}
    assert head_transform_from_config(Gemma2Config()) == {"softcap": 30.0, "logit_scale": 1.0}
    assert head_transform_from_config(CohereConfig(logit_scale=0.0625)) == {"softcap": None, "logit_scale": 0.0625}
    assert head_transform_from_config(GraniteConfig(logits_scaling=8.0)) == {"softcap": None, "logit_scale": 0.125}
    clova = types.SimpleNamespace(model_type="hyperclovax", logits_scaling=2.0)
    assert head_transform_from_config(clova) == {"softcap": None, "logit_scale": 2.0}


@pytest.fixture
def capped_model(monkeypatch):
    """The tiny task's model with a Gemma-style cap and a Cohere-style scale in its config and its forward."""
    from erpo.train import tiny_task

    real = tiny_task.build_model

    def capped(tokenizer):
        model = real(tokenizer)
        model.config.final_logit_softcapping, model.config.logit_scale = 4.0, 0.8
        model.get_output_embeddings().register_forward_hook(lambda m, i, out: 4.0 * torch.tanh(0.8 * out / 4.0))
        return model

    monkeypatch.setattr(tiny_task, "build_model", capped)


def test_fused_head_trains_a_capped_model_like_the_logits_path(tmp_path, capped_model):
    runs = {}
    for fused in (True, False):
        torch.manual_seed(0)
        trainer = make(tmp_path / str(fused), fused_head=fused)
        if fused:
            assert check_plain_head(trainer.policy) == {"softcap": 4.0, "logit_scale": 0.8}
        records = [trainer.train_step()[0] for _ in range(2)]
        runs[fused] = records, {k: v.detach().clone() for k, v in trainer.policy.state_dict().items()}
    (fused_records, fused_weights), (logit_records, logit_weights) = runs[True], runs[False]
    for got, want in zip(fused_records, logit_records):
        assert got["reward"] == want["reward"] and got["response_len"] == want["response_len"]
        for key in ("loss", "entropy", "approx_kl", "grad_norm"):
            assert got[key] == pytest.approx(want[key], rel=2e-4, abs=1e-6), key
    for key, value in logit_weights.items():
        torch.testing.assert_close(fused_weights[key], value, rtol=1e-4, atol=1e-5)


def test_a_config_that_does_not_name_the_cap_is_still_refused(tmp_path, capped_model, monkeypatch):
    from erpo.train import trainer as trainer_lib

    monkeypatch.setattr(trainer_lib, "head_transform", lambda model: {"softcap": None, "logit_scale": 1.0})
    with pytest.raises(ValueError, match="fused_head: this model's logits are not .* softcap=None"):
        make(tmp_path)


def test_head_fp32_flag_runs_the_fp32_head(tmp_path, monkeypatch):
    import erpo

    seen = []
    real = erpo.linear_policy_loss
    monkeypatch.setattr(erpo, "linear_policy_loss", lambda *a, **k: seen.append(k.get("head_fp32")) or real(*a, **k))
    record, _ = make(tmp_path, head_fp32=True).train_step()
    assert seen and all(seen) and record["nonfinite"] == 0
