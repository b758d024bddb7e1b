"""The TRL drop-in under truncated sampling (issue 23, docs/support.md): GRPOConfig's top_k / top_p / min_p are the
sampler's support S; the drop-in's loss scores the ratio and the KL over S, and the old and reference log-probs it
computes for TRL are over the same S. Without truncation the drop-in is what it was, bit for bit."""
import copy

import pytest
import torch

from tests.peers.inputs import assert_close, loss_floor
from tests.peers.test_trl_trainer import _args, _batch, _reward, _task


def _trainer(tmp_path, **kwargs):
    from erpo.integrations.trl import GRPOTrainer

    support_loss = kwargs.pop("support_loss", True)
    loss_config = kwargs.pop("loss_config", None)
    tokenizer, model, data = _task()
    if kwargs.get("beta"):  # TRL loads its reference model from the policy's name_or_path: give it a saved copy
        model.save_pretrained(tmp_path / "policy")
        model.config._name_or_path = str(tmp_path / "policy")
    trainer = GRPOTrainer(model=copy.deepcopy(model), reward_funcs=_reward, args=_args(tmp_path, **kwargs),
                          train_dataset=data, processing_class=tokenizer, support_loss=support_loss,
                          loss_config=loss_config)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(), which these tests do not run
    return model, tokenizer, trainer


def test_grpo_config_gives_the_support(trl_grpo, tmp_path):
    import erpo
    from erpo.integrations.trl import loss_config_from_trl, trl_support

    assert trl_support(_args(tmp_path)) is None  # TRL's defaults: top_k 0, top_p 1, min_p None
    assert trl_support(_args(tmp_path, top_k=0, top_p=1.0, min_p=0.0)) is None
    assert trl_support(_args(tmp_path, top_k=3)) == erpo.Support(top_k=3)
    assert trl_support(_args(tmp_path, top_p=0.8, min_p=0.05)) == erpo.Support(top_p=0.8, min_p=0.05)
    # generation_kwargs override GRPOConfig's own fields in TRL (GenerationConfig and vLLM's SamplingParams alike)
    assert trl_support(_args(tmp_path, top_k=3, generation_kwargs={"top_k": 0, "top_p": 0.9})) == erpo.Support(top_p=0.9)
    assert loss_config_from_trl(_args(tmp_path, top_k=3)).support == erpo.Support(top_k=3)
    assert loss_config_from_trl(_args(tmp_path, top_k=3), support_loss=False).support is None
    assert loss_config_from_trl(_args(tmp_path, top_k=3), erpo.LossConfig(method="erpo")).support == erpo.Support(top_k=3)


def test_top_p_with_min_p_under_transformers_generation_raises(trl_grpo, tmp_path):
    import erpo
    from erpo.integrations.trl import loss_config_from_trl

    with pytest.raises(ValueError, match="transformers applies min-p after top-p"):
        loss_config_from_trl(_args(tmp_path, top_p=0.8, min_p=0.1))
    assert loss_config_from_trl(_args(tmp_path, top_p=0.8, min_p=0.1), use_vllm=True).support == erpo.Support(
        top_p=0.8, min_p=0.1)  # vLLM applies min-p first, as erpo.Support does
    assert loss_config_from_trl(_args(tmp_path, top_p=0.8, min_p=0.1), support_loss=False).support is None
    with pytest.raises(ValueError, match=r"top_k=3.*loss_config.support=Support\(top_k=4"):
        loss_config_from_trl(_args(tmp_path, top_k=3), erpo.LossConfig(method="grpo", support=erpo.Support(top_k=4)))
    with pytest.raises(ValueError, match="support_loss=False"):
        loss_config_from_trl(_args(tmp_path, top_k=3), erpo.LossConfig(method="grpo", support=erpo.Support(top_k=3)),
                             support_loss=False)


def test_top_k_generation_samples_inside_the_support_the_loss_recomputes(trl_grpo, tmp_path, monkeypatch):
    """Two steps of training with top_k=3 (transformers generate): every sampled completion token is inside the S the
    loss recomputes from the trainer's logits (support_target_added 0, on every micro-batch), |S| is at most 3 and
    the kept mass is below 1 (so the full-vocabulary log-prob would differ), and the logged keys are there."""
    import erpo.integrations.trl as drop_in

    seen = []
    original = drop_in.support_metrics

    def recording(stats, valid):
        seen.append((stats.size[valid].clone(), stats.target_added[valid].clone(), valid.sum().item()))
        return original(stats, valid)

    monkeypatch.setattr(drop_in, "support_metrics", recording)
    _, _, trainer = _trainer(tmp_path, top_k=3)
    trainer.train()
    assert seen, "the loss never scored the support"
    assert sum(n for *_, n in seen) > 0
    for size, added, _ in seen:
        assert torch.all(added == 0), "a sampled token lies outside the support the loss recomputed"
        assert torch.all((size >= 1) & (size <= 3)), size
    logged = {}
    for record in trainer.state.log_history:
        for key, value in record.items():
            logged.setdefault(key, []).append(value)
    for key in ("support/size_mean", "support/singleton_frac", "support/target_added_frac",
                "support/mass_logratio_mean", "erpo/support_size_mean", "erpo/support_target_added"):
        assert key in logged, f"{key} not logged: {sorted(logged)}"
    assert all(v == 0 for v in logged["support/target_added_frac"] + logged["erpo/support_target_added"])
    assert all(v > 0 for v in logged["support/mass_logratio_mean"]), "S kept the whole mass: top_k=3 did nothing"


def _policy_loss_over_support(trainer, model, inputs):
    """erpo.policy_loss over S on the model's logits (the reference the drop-in must equal): loss, grads, metrics."""
    import erpo

    model = copy.deepcopy(model)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    prompt_len = inputs["prompt_ids"].size(1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    logits = model(input_ids=ids, attention_mask=attention).logits[:, prompt_len - 1:-1]
    mask = inputs["completion_mask"]
    batch = {"targets": inputs["completion_ids"], "mask": mask, "advantages": inputs["advantages"],
             "old_logp": inputs["old_per_token_logps"]}
    config = trainer.erpo_loss.current_config()
    if config.agg == "token-mean":
        batch["num_items_in_batch"] = inputs["num_items_in_batch"].float().clamp(min=1.0)
    else:
        batch["num_seqs_in_batch"] = torch.tensor(float(mask.size(0)))
    if "ref_per_token_logps" in inputs:
        batch["ref_logp"] = inputs["ref_per_token_logps"]
    result = erpo.policy_loss(logits, batch, config)
    result.loss.backward()
    return result, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss_type,overrides,head", [
    ("dapo", {"top_k": 3}, "fused"), ("grpo", {"top_p": 0.7}, "fused"), ("dapo", {"min_p": 0.2}, "fused"),
    ("dapo", {"top_k": 3, "top_p": 0.9, "temperature": 0.7}, "logits"), ("grpo", {"top_k": 3, "beta": 0.05}, "fused"),
    ("dapo", {"top_k": 4, "entropy_coef": 0.01}, "fused"),
])
def test_loss_equals_policy_loss_over_the_support(trl_grpo, tmp_path, loss_type, overrides, head):
    """On one batch the drop-in's loss, gradients and support metrics equal erpo.policy_loss over S on the model's
    logits (1e-5 relative); the ratio over S differs from the full vocabulary's."""
    import erpo

    model, tokenizer, trainer = _trainer(tmp_path, loss_type=loss_type, **overrides)
    assert trainer.loss_config.support is not None
    trainer._erpo_fused_head = head == "fused"
    inputs = _batch(model, tokenizer)
    if trainer.loss_config.kl_coef > 0:
        inputs["ref_per_token_logps"] = inputs["old_per_token_logps"] - 0.1
    result, expected_grads = _policy_loss_over_support(trainer, model, inputs)
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    grads = {n: p.grad for n, p in trainer.model.named_parameters() if p.grad is not None}
    assert_close(loss, result.loss, "loss", floor=loss_floor(inputs["advantages"]))
    assert grads.keys() == expected_grads.keys()
    for name in expected_grads:
        assert_close(grads[name], expected_grads[name], f"d loss / d {name}")
    logged = trainer._metrics["train"]
    for name in ("support_size_mean", "support_singleton_frac", "support_target_added", "support_mass_logratio",
                 "ratio_mean", "entropy"):
        assert_close(torch.tensor(logged[f"erpo/{name}"]), result.metrics[name].reshape(1).float(), name, floor=1e-6)
    assert logged["support/size_mean"] == pytest.approx(logged["erpo/support_size_mean"], rel=1e-6)
    assert logged["erpo/support_mass_logratio"][0] > 0, "S kept the whole mass: the support did nothing"


def test_old_and_ref_logps_are_scored_over_the_support(trl_grpo, tmp_path):
    """TRL's old/ref log-probs (its _get_per_token_logps_and_entropies, called in _generate_and_score_completions) are
    over S in the drop-in: equal to erpo.logprobs_and_entropy(support=S) on each model's own logits, for the policy
    (fused head and logits path) and a separate reference model; so the on-policy ratio over S is exactly 1."""
    import erpo

    model, tokenizer, trainer = _trainer(tmp_path, top_k=3)
    inputs = _batch(model, tokenizer)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    n = inputs["completion_ids"].size(1)
    targets = inputs["completion_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
    support = erpo.Support(top_k=3)
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    for reference in (model, other):
        with torch.no_grad():
            logits = reference(input_ids=ids, attention_mask=attention).logits[:, -n - 1:-1]
            expected, _ = erpo.logprobs_and_entropy(logits, targets, support=support)
            full, _ = erpo.logprobs_and_entropy(logits, targets)
        scored = trainer.model if reference is model else reference
        for fused in (True, False):
            trainer._erpo_fused_head = fused
            with torch.no_grad():
                logp, _, _ = trainer._get_per_token_logps_and_entropies(scored, ids, attention, n, batch_size=3)
            assert_close(logp, expected, f"old/ref logp over S (fused={fused})", floor=1e-6)
            assert (logp - full)[targets != -100].min() > 1e-4, "the old/ref log-probs ignore the support"
    trainer._erpo_fused_head = True
    with torch.no_grad():
        old, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, attention, n)
    inputs["old_per_token_logps"] = old
    trainer._compute_loss(trainer.model, inputs)
    assert trainer._metrics["train"]["erpo/ratio_mean"] == [1.0] and trainer._metrics["train"]["erpo/ratio_max"] == [1.0]


@pytest.mark.parametrize("overrides", [{}, {"top_k": 0, "top_p": 1.0, "min_p": 0.0}, {"top_k": 10_000},
                                       {"generation_kwargs": {"top_k": 0}}])
def test_without_truncation_the_drop_in_is_unchanged(trl_grpo, tmp_path, overrides):
    """top_p 1 / top_k 0 (or top_k >= V): no support anywhere; the loss and its gradients are bit for bit those of the
    full-vocabulary path (erpo's fused head into token_policy_loss, as before the support), and the old/ref log-probs
    are TRL's own."""
    import erpo

    model, tokenizer, trainer = _trainer(tmp_path, loss_type="dapo", **overrides)
    assert trainer._erpo_support is None
    inputs = _batch(model, tokenizer)
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    assert not any(k.startswith("support/") or "support" in k for k in trainer._metrics["train"])
    # the previous path, by hand
    reference = copy.deepcopy(model)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    n = inputs["completion_ids"].size(1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    hidden = reference.model(input_ids=ids, attention_mask=attention).last_hidden_state[:, -n - 1:-1]
    valid = inputs["completion_mask"].bool()
    logp, entropy = erpo.linear_logprobs_and_entropy(hidden, reference.lm_head.weight,
                                                     inputs["completion_ids"].masked_fill(~valid, -100))
    batch = {"mask": inputs["completion_mask"], "advantages": inputs["advantages"],
             "old_logp": inputs["old_per_token_logps"],
             "num_items_in_batch": inputs["num_items_in_batch"].clamp(min=1.0)}
    expected = erpo.token_policy_loss(logp, entropy, batch, trainer.loss_config).loss
    expected.backward()
    assert torch.equal(loss, expected)
    for (name, p), q in zip(trainer.model.named_parameters(), reference.parameters()):
        assert torch.equal(p.grad, q.grad), name
    # old/ref log-probs: TRL's own method
    with torch.no_grad():
        ours = trainer._get_per_token_logps_and_entropies(trainer.model, ids, torch.ones_like(ids), n)[0]
        theirs = trl_grpo.GRPOTrainer._get_per_token_logps_and_entropies(trainer, trainer.model, ids,
                                                                         torch.ones_like(ids), n)[0]
    assert torch.equal(ours, theirs)
