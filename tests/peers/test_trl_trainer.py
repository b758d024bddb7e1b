"""erpo.integrations.trl.GRPOTrainer (TRL 1.16's GRPOTrainer with erpo's loss) on the built-in task's tiny Llama:
it trains on CPU, logs erpo's metrics through TRL, and on one identical batch its loss and gradients equal TRL's
own GRPOTrainer path (TRL's fused head + TRL's loss) for the loss types both support, fp32, 1e-5 relative."""
import copy

import pytest
import torch

from tests.peers.inputs import assert_close, loss_floor


def _task():
    from datasets import Dataset

    from erpo.train import tiny_task

    tokenizer = tiny_task.build_tokenizer()
    torch.manual_seed(0)
    model = tiny_task.build_model(tokenizer).float()
    rows = tiny_task.problems()[:16]
    return tokenizer, model, Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])


def _reward(completions, answer, **kwargs):
    return [float(c.strip().startswith(a)) + 0.1 * len(c) for c, a in zip(completions, answer)]


def _args(tmp_path, **overrides):
    from trl import GRPOConfig

    kwargs = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, max_completion_length=4,
                  max_steps=2, learning_rate=1e-2, logging_steps=1, report_to="none", use_cpu=True, save_strategy="no",
                  seed=0, temperature=1.0,
                  bf16=False)  # GRPOConfig defaults to bf16 autocast; the parity checks are fp32
    kwargs.update(overrides)
    return GRPOConfig(**kwargs)


def test_trains_with_erpo_loss_and_logs_its_metrics(trl_grpo, tmp_path, monkeypatch):
    import erpo
    from erpo import LossConfig
    from erpo.integrations.trl import GRPOTrainer

    calls = []
    original = erpo.token_policy_loss

    def counting(*args, **kwargs):
        calls.append(args[3].method)
        return original(*args, **kwargs)

    monkeypatch.setattr(erpo, "token_policy_loss", counting)
    seen = []
    compute_loss = GRPOTrainer._compute_loss

    def recording(self, model, inputs):
        seen.append((inputs["prompt_ids"].clone(), inputs["erpo_group_ids"].clone()))
        return compute_loss(self, model, inputs)

    monkeypatch.setattr(GRPOTrainer, "_compute_loss", recording)
    tokenizer, model, data = _task()
    before = copy.deepcopy(model.state_dict())
    trainer = GRPOTrainer(model=model, reward_funcs=_reward, args=_args(tmp_path, bf16=True, num_generations=2),
                          train_dataset=data,
                          processing_class=tokenizer,
                          loss_config=LossConfig(method="erpo", controls=("erpo", "kl_cov"), kl_cov_ratio=0.2, eta=0.0))
    trainer.train()
    assert calls and set(calls) == {"erpo"}, "the trainer did not compute its loss with erpo"
    for prompt_ids, groups in seen:  # ERPO's groups: the completions of one prompt, after TRL's shuffle
        assert len(set(groups.tolist())) == 2
        for group in groups.unique():
            rows = prompt_ids[groups == group]
            assert len(rows) == 2 and torch.equal(rows[0], rows[1])
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "two optimizer steps left every parameter unchanged"
    logged = {k for record in trainer.state.log_history for k in record}
    assert "erpo/entropy" in logged and "erpo/n_valid_tokens" in logged, sorted(logged)
    assert any(k.startswith("erpo/") and "gate" in k for k in logged), sorted(logged)  # ERPO's gate ran on groups


def _batch(model, tokenizer, seed=0):
    """One GRPO batch as TRL's _generate_and_score_completions hands it to _compute_loss (fixed, random)."""
    gen = torch.Generator().manual_seed(seed)
    batch, prompt_len, completion_len = 4, 5, 6
    vocab = model.config.vocab_size
    prompt_ids = torch.randint(3, vocab, (batch, prompt_len), generator=gen)
    completion_ids = torch.randint(3, vocab, (batch, completion_len), generator=gen)
    completion_mask = torch.ones(batch, completion_len, dtype=torch.long)
    completion_mask[1, 4:] = 0
    completion_mask[3, 2:] = 0
    completion_mask[2, :] = 0  # a completion with no valid token (all tool output, or masked truncation)
    with torch.no_grad():
        ids = torch.cat([prompt_ids, completion_ids], 1)
        logp = torch.log_softmax(model(input_ids=ids).logits[:, prompt_len - 1:-1].float(), -1)
        logp = logp.gather(-1, completion_ids[..., None])[..., 0]
    noise = 0.3 * torch.randn(logp.shape, generator=gen)
    return {
        "prompt_ids": prompt_ids, "prompt_mask": torch.ones_like(prompt_ids), "completion_ids": completion_ids,
        "completion_mask": completion_mask, "advantages": torch.randn(batch, generator=gen),
        "old_per_token_logps": -(logp + noise).abs() - 1e-4, "num_items_in_batch": completion_mask.sum(),
    }


# (loss_type, GRPOConfig overrides, head): "logits" is the path of models whose head erpo cannot fuse
@pytest.mark.parametrize("loss_type,overrides,head", [
    ("dapo", {}, "fused"), ("grpo", {}, "fused"), ("dr_grpo", {}, "fused"), ("bnpo", {}, "fused"),
    ("cispo", {"epsilon_high": 1.3}, "fused"), ("sapo", {}, "fused"),
    ("luspo", {"importance_sampling_level": "sequence"}, "fused"), ("vespo", {}, "fused"),
    ("dapo", {"top_entropy_quantile": 0.4}, "fused"), ("dapo", {"temperature": 0.7, "delta": 1.5}, "fused"),
    ("dapo", {}, "logits"), ("grpo", {"temperature": 0.7}, "logits"),
])
def test_loss_and_grads_equal_trl_on_one_batch(trl_grpo, tmp_path, loss_type, overrides, head):
    from erpo.integrations.trl import GRPOTrainer

    tokenizer, model, data = _task()
    args = _args(tmp_path, loss_type=loss_type, **overrides)
    ours = GRPOTrainer(model=copy.deepcopy(model), reward_funcs=_reward, args=args, train_dataset=data,
                       processing_class=tokenizer)
    assert ours._erpo_fused_head, "the tiny Llama's head is a plain Linear: erpo must fuse it"
    ours._erpo_fused_head = head == "fused"
    theirs = trl_grpo.GRPOTrainer(model=copy.deepcopy(model), reward_funcs=_reward, args=args, train_dataset=data,
                                  processing_class=tokenizer)
    inputs = _batch(model, tokenizer)
    results = []
    for trainer in (ours, theirs):
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(), which this test does not run
        loss = trainer._compute_loss(trainer.model, inputs)
        loss.backward()
        results.append((loss, {n: p.grad for n, p in trainer.model.named_parameters() if p.grad is not None}))
    (loss, grads), (expected, expected_grads) = results
    assert_close(loss, expected, f"{loss_type} loss", floor=loss_floor(inputs["advantages"]))
    assert grads.keys() == expected_grads.keys()
    for name in expected_grads:
        assert_close(grads[name], expected_grads[name], f"{loss_type} d loss / d {name}")


def test_option_erpo_cannot_honour_raises(trl_grpo, tmp_path):
    from erpo.integrations.trl import GRPOTrainer

    tokenizer, model, data = _task()
    with pytest.raises(ValueError, match="use_adaptive_entropy=True with top_entropy_quantile"):
        GRPOTrainer(model=model, reward_funcs=_reward, train_dataset=data, processing_class=tokenizer,
                    args=_args(tmp_path, use_adaptive_entropy=True, top_entropy_quantile=0.5))


def test_adaptive_entropy_steps_once_per_optimizer_step(trl_grpo, tmp_path):
    """TRL's use_adaptive_entropy through erpo's controller: the coefficient moves by entropy_coef_delta once per
    optimizer step (not per micro-batch), up while the window's entropy is <= entropy_target."""
    from erpo.integrations.trl import GRPOTrainer

    tokenizer, model, data = _task()
    args = _args(tmp_path, use_adaptive_entropy=True, entropy_target=50.0, entropy_coef=0.01, entropy_coef_delta=0.004,
                 gradient_accumulation_steps=2)
    trainer = GRPOTrainer(model=model, reward_funcs=_reward, args=args, train_dataset=data, processing_class=tokenizer)
    assert trainer.loss_config.entropy_target == 50.0
    trainer.train()
    assert trainer.erpo_controller.coef == pytest.approx(0.01 + 2 * 0.004)
    logged = [r["erpo/entropy_coef"] for r in trainer.state.log_history if "erpo/entropy_coef" in r]
    assert logged and logged[-1] == pytest.approx(0.018)


def test_stateful_control_steps_and_its_state_is_checkpointed(trl_grpo, tmp_path):
    """A stateful erpo control (REPO-R's zeta) is stepped by the trainer, and its state is saved with each checkpoint
    and required on resume (never silently restarted)."""
    import json
    import os

    from erpo import LossConfig
    from erpo.integrations.trl import CONTROLLER_FILE, GRPOTrainer

    tokenizer, model, data = _task()
    config = LossConfig(method="repo_r", target_entropy=50.0)
    args = _args(tmp_path, save_strategy="steps", save_steps=1)
    trainer = GRPOTrainer(model=model, reward_funcs=_reward, args=args, train_dataset=data, processing_class=tokenizer,
                          loss_config=config)
    trainer.train()
    assert trainer.erpo_controller.state_dict()["steps"] == 2
    assert abs(trainer.erpo_controller.value) != abs(config.zeta), "zeta never moved"
    with open(os.path.join(tmp_path, "checkpoint-2", CONTROLLER_FILE)) as f:
        assert json.load(f) == trainer.erpo_controller.state_dict()
    os.remove(os.path.join(tmp_path, "checkpoint-2", CONTROLLER_FILE))
    with pytest.raises(FileNotFoundError, match=CONTROLLER_FILE):
        trainer._load_optimizer_and_scheduler(os.path.join(tmp_path, "checkpoint-2"))


def test_conflicting_trl_option_and_loss_config_raise(trl_grpo, tmp_path):
    from erpo import LossConfig
    from erpo.integrations.trl import loss_config_from_trl

    with pytest.raises(ValueError, match="beta=0.1"):
        loss_config_from_trl(_args(tmp_path, beta=0.1), LossConfig(method="erpo"))
    config = loss_config_from_trl(_args(tmp_path, temperature=0.7), LossConfig(method="erpo"))
    assert config.method == "erpo" and config.temperature == 0.7


def _both_trainers(trl_grpo, tmp_path, loss_type, overrides):
    """erpo's drop-in and TRL's own GRPOTrainer on the same tiny model and GRPOConfig."""
    from erpo.integrations.trl import GRPOTrainer

    tokenizer, model, data = _task()
    args = _args(tmp_path, loss_type=loss_type, **overrides)
    if args.beta != 0:  # TRL loads its reference model from the policy's name_or_path: give it a saved copy
        model.save_pretrained(tmp_path / "policy")
        model.config._name_or_path = str(tmp_path / "policy")
    trainers = [cls(model=copy.deepcopy(model), reward_funcs=_reward, args=args, train_dataset=data,
                    processing_class=tokenizer) for cls in (GRPOTrainer, trl_grpo.GRPOTrainer)]
    for trainer in trainers:
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(), which these tests do not run
    return model, tokenizer, trainers


def _compute(trainer, inputs):
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    return loss, {n: p.grad for n, p in trainer.model.named_parameters() if p.grad is not None}


def _with_ref(trainer, model, inputs):
    """TRL's ref_per_token_logps for a beta != 0 batch: the (frozen) reference model's log-probs, near the policy's."""
    with torch.no_grad():
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        prompt_len = inputs["prompt_ids"].size(1)
        logp = torch.log_softmax(model(input_ids=ids).logits[:, prompt_len - 1:-1].float(), -1)
        logp = logp.gather(-1, inputs["completion_ids"][..., None])[..., 0]
    return {**inputs, "ref_per_token_logps": -(logp + 0.2 * torch.randn(logp.shape)).abs() - 1e-4}


@pytest.mark.parametrize("loss_type,overrides", [
    ("dapo", {"entropy_coef": 0.01}), ("grpo", {"entropy_coef": 0.02, "beta": 0.04}),
    ("dapo", {"use_adaptive_entropy": True, "entropy_target": 50.0, "entropy_coef": 0.01}),
    ("dapo", {"beta": 0.1, "use_bias_correction_kl": True}), ("cispo", {"epsilon_high": 1.3}), ("vespo", {}),
    ("luspo", {"importance_sampling_level": "sequence", "entropy_coef": 0.01}), ("sapo", {}),
    ("bnpo", {"top_entropy_quantile": 0.5}),
])
def test_logs_every_key_trl_logs_with_its_value(trl_grpo, tmp_path, loss_type, overrides):
    """Every key TRL 1.16's _compute_loss logs for the configuration (policy_loss and entropy_coef with the entropy
    bonus, kl, entropy, clip_ratio/*, cispo_clip_ratio, vespo/phi_seq_mean) is logged by the drop-in, with TRL's value
    on the same batch (1e-5 relative)."""
    model, tokenizer, (ours, theirs) = _both_trainers(trl_grpo, tmp_path, loss_type, overrides)
    inputs = _batch(model, tokenizer)
    if ours.loss_config.kl_coef > 0:
        inputs = _with_ref(ours, model, inputs)
    for trainer in (ours, theirs):
        _compute(trainer, inputs)
    logged, expected = ours._metrics["train"], theirs._metrics["train"]
    missing = sorted(set(expected) - set(logged))
    assert not missing, f"TRL logs {missing}, the drop-in does not"
    for key, values in expected.items():
        assert len(logged[key]) == len(values), f"{key}: logged {len(logged[key])} times, TRL {len(values)}"
        assert_close(torch.tensor(logged[key]), torch.tensor(values), key, floor=1e-6)


def test_all_masked_micro_batch_is_a_zero_step_like_trl(trl_grpo, tmp_path):
    """Every completion masked (TRL's mask_truncated_completions with every completion truncated, or all tool output):
    TRL takes the step with loss 0 and no gradient; the drop-in too (erpo raised "batch has no valid token"), and counts
    it in erpo/n_empty_batches."""
    model, tokenizer, (ours, theirs) = _both_trainers(trl_grpo, tmp_path, "dapo", {"entropy_coef": 0.01})
    inputs = _batch(model, tokenizer)
    inputs["completion_mask"] = torch.zeros_like(inputs["completion_mask"])
    inputs["num_items_in_batch"] = inputs["completion_mask"].sum()
    (loss, grads), (expected, _) = (_compute(t, inputs) for t in (ours, theirs))
    assert loss.item() == 0.0 == expected.item() and loss.requires_grad
    assert all(torch.isfinite(g).all() and not g.any() for g in grads.values())
    assert ours._metrics["train"]["erpo/n_empty_batches"] == [1.0]
    assert "erpo/entropy" not in ours._metrics["train"], "an empty micro-batch's means are not measurements"
    assert ours._metrics["train"]["entropy"] == theirs._metrics["train"]["entropy"]


def test_trains_when_every_completion_is_truncated_and_masked(trl_grpo, tmp_path):
    """TRL's test_train_with_mask_truncated_completions_all_masked, with the drop-in: the end of sequence (and the pad
    token, which TRL also reads as an end) is suppressed, every completion hits max_completion_length and is masked;
    training runs, changes nothing, counts the empty steps, and the adaptive entropy controller, which measured
    nothing, keeps its coefficient (TRL's would step on an entropy of 0)."""
    from erpo.integrations.trl import GRPOTrainer

    tokenizer, model, data = _task()
    before = copy.deepcopy(model.state_dict())
    args = _args(tmp_path, mask_truncated_completions=True, use_adaptive_entropy=True, entropy_target=50.0,
                 entropy_coef=0.01,
                 generation_kwargs={"suppress_tokens": [tokenizer.eos_token_id, tokenizer.pad_token_id]})
    trainer = GRPOTrainer(model=model, reward_funcs=_reward, args=args, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "an all-masked step changed a weight"
    assert trainer.erpo_controller.coef == 0.01 and trainer.erpo_controller.steps == 0
    counts = [r["erpo/n_empty_batches"] for r in trainer.state.log_history if "erpo/n_empty_batches" in r]
    assert counts and all(c == 1.0 for c in counts)


def test_top_entropy_quantile_zero_keeps_the_top_token_like_trl(trl_grpo, tmp_path):
    """TRL documents top_entropy_quantile=0.0 as valid (it keeps only the highest-entropy token); the drop-in refused
    it (erpo required rho > 0). Loss and gradients equal TRL's on one batch."""
    model, tokenizer, (ours, theirs) = _both_trainers(trl_grpo, tmp_path, "dapo", {"top_entropy_quantile": 0.0})
    assert ours.loss_config.rho == 0.0 and ours.loss_config.controls == ("high_entropy_mask",)
    inputs = _batch(model, tokenizer)
    (loss, grads), (expected, expected_grads) = (_compute(t, inputs) for t in (ours, theirs))
    assert_close(loss, expected, "loss", floor=loss_floor(inputs["advantages"]))
    assert grads.keys() == expected_grads.keys()
    for name in expected_grads:
        assert_close(grads[name], expected_grads[name], f"d loss / d {name}")
