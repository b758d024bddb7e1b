"""The loop's wiring, in process on the built-in task with tiny batches."""
import math

import pytest
import torch

from erpo.train.config import from_dict
from erpo.train.trainer import NonFiniteError, Trainer

SMALL = dict(prompts_per_step=3, group_size=4, mini_batches=1, sft_warmup_steps=3, progress=False, plots=False, eval_every=0,
             save_every=0, threads=1)


def make(tmp_path, **over):
    return Trainer(from_dict({**SMALL, "out_dir": str(tmp_path), **over}))


def test_groups_are_consecutive_samples_of_one_prompt(tmp_path):
    trainer = make(tmp_path)
    out, scores, problems = trainer.rollout()
    assert len(out.prompt_ids) == 12 and len(scores) == 12 and problems == []
    for g in range(3):
        assert len({tuple(p) for p in out.prompt_ids[4 * g : 4 * g + 4]}) == 1
    record, _ = trainer.train_step()
    assert record["step"] == 1 and math.isfinite(record["loss"]) and record["nonfinite"] == 0
    for key in ("reward", "entropy", "clip_frac_low", "clip_frac_high", "approx_kl", "response_len", "tokens_per_s"):
        assert key in record


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_micro_batches_add_up_to_the_batch_gradient(tmp_path, agg):
    """Through the trainer's own accumulation: one optimizer step over micro-batches of one group each gives
    the gradient of the same step taken as one big batch, for each aggregation (the normaliser is global)."""
    trainer = make(tmp_path, prompts_per_step=4, group_size=4, fused_head=False, max_new_tokens=4)
    loss_cfg = trainer.loss_cfg.replace(agg=agg)
    prepared = trainer.prepare(loss_cfg)
    batch, tensors = prepared.batch, prepared.tensors
    tensors["advantages"] = torch.randn(tensors["advantages"].shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # off-policy, so clipping and ratios differ between tokens
        tensors["old_logp"] = tensors["old_logp"] + 0.3 * torch.randn(tensors["old_logp"].shape,
                                                                      generator=torch.Generator().manual_seed(4))
    assert len({int(l) for l in batch["mask"].sum(-1)}) > 1  # responses of different lengths
    grads = {}
    for name, micro_rows in (("whole", [slice(0, 16)]), ("micro", [slice(4 * g, 4 * g + 4) for g in range(4)])):
        trainer.optimizer.zero_grad(set_to_none=True)
        loss = trainer.accumulate(batch, tensors, micro_rows, loss_cfg, {}, 1.0)
        grads[name] = (loss, [p.grad.clone() for p in trainer.policy.parameters()])
    assert grads["micro"][0] == pytest.approx(grads["whole"][0], rel=1e-5)
    for got, want in zip(grads["micro"][1], grads["whole"][1]):
        # Summation order differs (float32 model); a wrong normaliser would be off by a factor of order 1.
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


def _poison_gradients(trainer, value):
    """A backward hook turns one parameter's gradient into NaN/inf, as an overflow would."""
    return trainer.policy.model.norm.weight.register_hook(lambda grad: grad * value)


def test_nonfinite_gradient_skips_the_update_and_reports_the_step(tmp_path, capsys):
    trainer = make(tmp_path, max_nonfinite=2)
    trainer.train_step()
    hook = _poison_gradients(trainer, float("nan"))
    before = {k: v.clone() for k, v in trainer.policy.state_dict().items()}
    record, _ = trainer.train_step()
    assert record["nonfinite"] == 1 and not math.isfinite(record["grad_norm"])
    assert "step 2: non-finite gradient" in capsys.readouterr().out
    for key, value in trainer.policy.state_dict().items():
        assert torch.equal(value, before[key]), key  # the update was skipped
    with pytest.raises(NonFiniteError, match="step 3: non-finite.*2 in a row"):
        trainer.train_step()
    hook.remove()
    record, _ = trainer.train_step()  # a healthy step resets the streak
    assert record["nonfinite"] == 0 and trainer.nonfinite_streak == 0


def test_nonfinite_stop_policy(tmp_path):
    trainer = make(tmp_path, on_nonfinite="stop")
    _poison_gradients(trainer, float("inf"))
    with pytest.raises(NonFiniteError, match="step 1: non-finite"):
        trainer.train_step()


@pytest.mark.parametrize("method", ["dapo", "dr_grpo", "erpo", "high_entropy_mask", "clip_cov", "kl_cov", "repo", "repo_r", "adapo"])
def test_every_method_trains_a_step(tmp_path, method):
    over = {"loss_args": {"kl_cov_anneal": "linear"}} if method == "kl_cov" else {}
    trainer = make(tmp_path, loss=method, **over)
    record, _ = trainer.train_step()
    assert math.isfinite(record["loss"]) and record["nonfinite"] == 0
    if method == "erpo":
        assert trainer.ref is not None and "cdp_rate" in record
    if trainer.controller is not None:
        assert trainer.controller.state_dict()["steps"] == 1


@pytest.mark.parametrize("method,over", [("grpo", {}), ("erpo", {"micro_batch_groups": 1}), ("kl_cov", {"ppo_epochs": 2})])
def test_fused_head_trains_like_the_logits_path(tmp_path, monkeypatch, method, over):
    """The default fused head (hidden states + LM head, logits never stored) and --no-fused-head give the same
    steps to fp32 rounding: same samples, rewards, losses, metrics and weights (one-pass and two-pass losses,
    micro-batches, an off-policy second epoch)."""
    import erpo

    calls = {"linear_policy_loss": 0, "linear_logprobs_and_entropy": 0}
    for name in calls:
        real = getattr(erpo, name)
        monkeypatch.setattr(erpo, name, lambda *a, _real=real, _name=name, **k: calls.__setitem__(
            _name, calls[_name] + 1) or _real(*a, **k))
    runs = {}
    for fused in (True, False):
        torch.manual_seed(0)
        trainer = make(tmp_path / str(fused), loss=method, fused_head=fused, **over)
        before = dict(calls)
        records = [trainer.train_step()[0] for _ in range(3)]
        used = {name: calls[name] - before[name] for name in calls}
        assert all(used.values()) if fused else not any(used.values()), (fused, used)  # the path asked for ran
        runs[fused] = records, {k: v.detach().clone() for k, v in trainer.policy.state_dict().items()}
    (fused_records, fused_weights), (logit_records, logit_weights) = runs[True], runs[False]
    for got, want in zip(fused_records, logit_records):
        assert got["reward"] == want["reward"] and got["response_len"] == want["response_len"]  # same samples
        for key in ("loss", "entropy", "approx_kl", "grad_norm", "ratio_mean"):
            assert got[key] == pytest.approx(want[key], rel=2e-4, abs=1e-6), key
    for key, value in logit_weights.items():
        torch.testing.assert_close(fused_weights[key], value, rtol=1e-4, atol=1e-5)


def test_fused_head_refuses_a_model_whose_logits_are_not_the_head(tmp_path, monkeypatch):
    from erpo.train import tiny_task

    real = tiny_task.build_model

    def capped(tokenizer):  # a soft-capped head, as Gemma 2 has: logits != hidden @ W.T
        model = real(tokenizer)
        model.get_output_embeddings().register_forward_hook(lambda m, i, out: 5 * torch.tanh(out / 5))
        return model

    monkeypatch.setattr(tiny_task, "build_model", capped)
    with pytest.raises(ValueError, match="fused_head: this model's logits are not"):
        make(tmp_path)
    make(tmp_path / "logits", fused_head=False)  # the logits path takes it


def test_the_warm_up_leaves_no_gradient_for_the_first_rl_update():
    """A gradient left on the parameters by the supervised warm-up would be added into the first RL update."""
    from erpo.train import tiny_task

    tokenizer = tiny_task.build_tokenizer()
    model = tiny_task.build_model(tokenizer)
    tiny_task.warm_up(model, tokenizer, steps=2, batch_size=4)
    assert all(p.grad is None for p in model.parameters())
