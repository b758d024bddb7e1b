"""Off-policy updates (mini_batches x ppo_epochs optimizer steps per rollout batch, old log-probs fixed at
sampling), the on-policy warning, DAPO's dynamic sampling and overlong shaping, Dr. GRPO's constant L_max."""
import dataclasses

import pytest

from erpo.train import dynamic_sampling, offpolicy, reward_shaping, trainer as trainer_lib
from erpo.train.config import from_dict
from erpo.train.trainer import Trainer, loss_config

SMALL = dict(prompts_per_step=4, group_size=4, sft_warmup_steps=3, progress=False, plots=False, eval_every=0,
             save_every=0, threads=1)


def make(tmp_path, **over):
    return Trainer(from_dict({**SMALL, "out_dir": str(tmp_path), **over}))


def test_mini_batches_are_optimizer_steps_against_the_sampling_policy(tmp_path, monkeypatch):
    calls = {"fixed": 0, "opt": 0}
    real_fixed = trainer_lib.fixed_logprobs
    monkeypatch.setattr(trainer_lib, "fixed_logprobs",
                        lambda *a, **k: calls.__setitem__("fixed", calls["fixed"] + 1) or real_fixed(*a, **k))
    # The entropy bonus moves the policy even when every group's rewards are equal (zero advantages).
    trainer = make(tmp_path, loss="dapo", mini_batches=4, ppo_epochs=2, loss_args={"entropy_coef": 0.01})
    trainer.optimizer.register_step_post_hook(lambda *a: calls.__setitem__("opt", calls["opt"] + 1))
    record, _ = trainer.train_step()
    assert calls["opt"] == 8 and record["optimizer_steps"] == 8
    assert calls["fixed"] == 2  # old log-probs once at sampling (no reference for DAPO), one policy-shift pass
    assert record["approx_kl"] > 1e-5 and record["shift_ratio_std"] > 1e-3
    assert record["shift_ratio_min"] < 1 < record["shift_ratio_max"]
    assert trainer.scheduler.last_epoch == 1  # the LR schedule counts RL steps


def test_fully_on_policy_has_ratio_one(tmp_path):
    record, _ = make(tmp_path, loss="dapo", mini_batches=1).train_step()
    assert record["optimizer_steps"] == 1
    assert record["approx_kl"] < 1e-8 and record["clip_frac_low"] == 0 and record["clip_frac_high"] == 0


def test_on_policy_warning_names_the_mechanisms_that_cannot_act(tmp_path, capsys):
    cfg = from_dict({**SMALL, "mini_batches": 1})
    for method, named in (("dapo", "clip-higher"), ("adapo", "ADAPO"), ("kl_cov", "KL-Cov"), ("grpo", "PPO clip"),
                          ("gspo", "sequence-level ratio"), ("cispo", "CISPO"), ("sapo", "SAPO"), ("gmpo", "GMPO")):
        text = offpolicy.on_policy_warning(dataclasses.replace(cfg, loss=method),
                                           loss_config(dataclasses.replace(cfg, loss=method)))
        assert text and named in text, method
    kl_cov = offpolicy.inert_on_policy(loss_config(dataclasses.replace(cfg, loss="kl_cov")))
    assert not any("PPO clip" in name for name in kl_cov)  # KL-Cov has no clip to lose
    composed = dataclasses.replace(cfg, loss="grpo", loss_args={"controls": "kl_cov"})
    assert "KL-Cov" in offpolicy.on_policy_warning(composed, loss_config(composed))
    assert offpolicy.on_policy_warning(dataclasses.replace(cfg, loss="gpg"), loss_config(dataclasses.replace(
        cfg, loss="gpg"))) is None  # no ratio: nothing to lose
    assert offpolicy.on_policy_warning(dataclasses.replace(cfg, mini_batches=2), loss_config(cfg)) is None
    assert offpolicy.on_policy_warning(dataclasses.replace(cfg, ppo_epochs=2), loss_config(cfg)) is None
    make(tmp_path, loss="adapo", mini_batches=1, steps=1).train()
    printed = capsys.readouterr()
    assert "warning: mini_batches=1 and ppo_epochs=1" in " ".join((printed.out + printed.err).split())


def test_mini_batches_must_hold_a_group(tmp_path):
    with pytest.raises(ValueError, match=r"mini_batches \(5\) exceeds prompts_per_step \(4\)"):
        from_dict({**SMALL, "mini_batches": 5})


def _group(rewards):
    return dynamic_sampling.Group([1], [[2]] * len(rewards), [True] * len(rewards), rewards, rewards)


def test_dynamic_sampling_keeps_informative_groups_until_full():
    rounds = iter([[_group([0, 0]), _group([0, 1]), _group([1, 1])], [_group([1, 0]), _group([1, 0]), _group([0, 0])]])
    got = dynamic_sampling.collect(lambda: next(rounds), 2, True, 4)
    assert [g.rewards for g in got.groups] == [[0, 1], [1, 0]]
    assert got.tries == 2 and got.filler == 0 and got.dropped == 3 and len(got.sampled) == 6


def test_dynamic_sampling_stops_at_its_cap_and_fills_with_dropped_groups():
    draws = []

    def draw():
        draws.append(1)
        return [_group([0, 0]), _group([1, 1])]

    got = dynamic_sampling.collect(draw, 2, True, 3)
    assert len(draws) == 3 and got.tries == 3 and got.filler == 2 and len(got.groups) == 2
    off = dynamic_sampling.collect(lambda: [_group([0, 0]), _group([1, 1])], 2, False, 3)
    assert off.tries == 1 and off.filler == 0 and [g.rewards for g in off.groups] == [[0, 0], [1, 1]]


def test_dynamic_sampling_draws_until_every_rank_is_full():
    """A full rank keeps drawing rounds (and discards them) while another rank is short, so the ranks'
    prompt samplers advance together."""
    others_full = iter([False, False, True])
    got = dynamic_sampling.collect(lambda: [_group([0, 1])], 1, True, 5, lambda full: full and next(others_full))
    assert got.tries == 3 and [g.rewards for g in got.groups] == [[0, 1]]


def test_dynamic_sampling_in_the_trainer(tmp_path):
    trainer = make(tmp_path, loss="dapo", dynamic_sampling=True, dynamic_sampling_max_tries=3)
    record, _ = trainer.train_step()
    assert 1 <= record["sampling_tries"] <= 3
    assert record["degenerate_groups"] == record["filler_groups"]  # only fillers lack an advantage
    assert record["filler_groups"] == 0 or record["sampling_tries"] == 3


def test_overlong_penalty_is_dapos_linear_ramp():
    assert reward_shaping.overlong_penalties([1, 2, 3, 4, 5], 5, 2, 1.0) == [0.0, 0.0, 0.0, -0.5, -1.0]
    assert reward_shaping.overlong_penalties([9, 10], 10, 4, 0.5) == pytest.approx([-0.375, -0.5])
    assert reward_shaping.overlong_penalties([5], 5, 0, 1.0) == [0.0]


def test_overlong_shaping_lowers_the_trained_reward_of_long_responses(tmp_path):
    record, _ = make(tmp_path, overlong_buffer=2, mini_batches=1).train_step()
    assert record["truncated_frac"] > 0  # the barely warmed-up model rambles to max_new_tokens
    assert record["reward_trained"] < record["reward"] - 0.1 * record["truncated_frac"]
    with pytest.raises(ValueError, match="overlong_buffer must be in"):
        from_dict({**SMALL, "overlong_buffer": 5})


def test_dr_grpo_normalises_by_the_constant_max_new_tokens():
    cfg = from_dict({**SMALL, "loss": "dr_grpo", "max_new_tokens": 7})
    assert loss_config(cfg).agg == "seq-mean-token-sum-norm" and loss_config(cfg).max_len == 7
    assert loss_config(dataclasses.replace(cfg, loss_args={"max_len": 9})).max_len == 9


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum-norm"])
def test_ddp_gradient_equals_the_union_batch_gradient(tmp_path, agg):
    """2 gloo ranks, micro-batches of one group: the DDP-averaged gradient is the gradient of the loss over
    both ranks' batches taken as one (the normaliser counts every rank's tokens/responses)."""
    import json
    import os
    import signal
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
           "tests.train.ddp_grad_driver", str(tmp_path), agg]
    # Own session: a timeout kills torchrun's workers too (a lone rank would wait in a collective forever).
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, stderr[-3000:]
    found = json.loads((tmp_path / "result.json").read_text())
    assert found["grad_norm"] > 1e-3
    assert found["global_err"] < 1e-5, found
    if agg == "token-mean" and found["tokens"][0] != found["tokens"][1]:
        assert found["local_err"] > 1e-3, found  # the control: rank-local means are a different gradient


def test_a_run_saved_before_mini_batches_existed_resumes_on_policy(tmp_path):
    """Its saved config has no mini_batches: the resume keeps the one optimizer step per batch it trained with."""
    import json

    from erpo.train import checkpoint
    from erpo.train.config import resumed_values

    make(tmp_path, steps=1, save_every=1, mini_batches=2).train()
    path = checkpoint.resolve(str(tmp_path))
    config_path = tmp_path / path.split(str(tmp_path))[1].strip("/") / "train_config.json"
    saved = json.loads(config_path.read_text())
    del saved["mini_batches"]
    config_path.write_text(json.dumps(saved))
    assert resumed_values({"resume": str(tmp_path)})["mini_batches"] == 1
