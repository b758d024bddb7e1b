"""The training loop: GRPO-style RL from verifiable rewards with erpo's fused policy losses.

One step: sample prompts -> G completions each -> rewards -> group advantages -> old (and reference)
log-probs with the fused op's no-grad path -> `erpo.policy_loss` -> AdamW step (clipped, scheduled,
accumulated over micro-batches of whole groups) -> loss-controller step -> weights synced to the rollout
engine -> metrics, eval, checkpoint. Read top to bottom; the parts live in the sibling modules.
"""
import dataclasses
from dataclasses import dataclass
import math
import os
import shutil
import time

import torch
from transformers.utils import logging as hf_logging

import erpo
from erpo.losses import LossConfig, PolicyLoss, advantages as advantages_lib, policy_loss
from erpo.ops.linear_logprobs_entropy import head_transform_from_config
from erpo.train import checkpoint, data, distributed, metrics as metrics_lib, model as model_lib, plots
from erpo.train import dynamic_sampling, normalizer, offpolicy, reward_shaping
from erpo.train import rewards as rewards_lib, rollout as rollout_lib, tiny_task
from erpo.train.config import TrainConfig, did_you_mean, save as save_config
from erpo.train.errors import CheckpointWriteError, NonFiniteError, RunInterrupted
from erpo.train.evaluate import evaluate


def loss_config(cfg: TrainConfig) -> LossConfig:
    if "temperature" in cfg.loss_args or "method" in cfg.loss_args:
        raise ValueError("set `temperature` and `loss` as top-level config keys, not in loss_args "
                         "(rollouts and loss must share the temperature)")
    known = {f.name for f in dataclasses.fields(LossConfig)}
    for key in cfg.loss_args:
        if key not in known:
            raise ValueError(f"loss_args: unknown LossConfig key {key!r}{did_you_mean(key, known)}; docs/losses.md "
                             "lists them all")
    try:
        # Dr. GRPO's L_max is a constant, the longest response allowed (not the longest one of a micro-batch).
        return LossConfig(method=cfg.loss, temperature=cfg.temperature,
                          support=loss_support(cfg),
                          **{"max_len": cfg.max_new_tokens, **cfg.loss_args})
    except TypeError as err:
        raise ValueError(f"loss_args: {err}") from None


def loss_support(cfg: TrainConfig):
    """The support the loss and the old/ref log-probs are scored on: the sampler's, unless --no-support-loss."""
    return cfg.support if cfg.support_loss else None


def lr_lambda(cfg: TrainConfig):
    def factor(step: int) -> float:
        if step < cfg.lr_warmup_steps:
            return (step + 1) / cfg.lr_warmup_steps
        progress = (step - cfg.lr_warmup_steps) / max(1, cfg.steps - cfg.lr_warmup_steps)
        if cfg.lr_schedule == "linear":
            return max(0.0, 1.0 - progress)
        if cfg.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0
    return factor


def response_logits(model, batch: dict, rows: slice, autocast: bool):
    """Logits around the response, [n, R + 1, V]: only the last R + 1 positions are computed; position i predicts
    response token i and the last one is dropped by the loss (`shift=True`), so no sliced view's gradient is
    copied into a fresh full-size buffer in the backward."""
    width_r = batch["targets"].shape[1]
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        out = model(input_ids=batch["input_ids"][rows], attention_mask=batch["attention_mask"][rows],
                    position_ids=batch["position_ids"][rows], logits_to_keep=width_r + 1, use_cache=False)
    return out.logits


def response_hidden(model, batch: dict, rows: slice, autocast: bool):
    """Final hidden states predicting each response token, [n, R, H] (a strided view: read in place by the
    fused head). The model computes logits for one position only: the head runs inside erpo's loss."""
    width_r = batch["targets"].shape[1]
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        out = model(input_ids=batch["input_ids"][rows], attention_mask=batch["attention_mask"][rows],
                    position_ids=batch["position_ids"][rows], logits_to_keep=1, use_cache=False,
                    output_hidden_states=True)
    return out.hidden_states[-1][:, -(width_r + 1):-1]


def output_head(model, dtype: torch.dtype, head_fp32: bool = False):
    """The LM head's (weight [V, H], bias [V] or None), cast to the hidden states' dtype (a differentiable cast:
    the gradient reaches the float32 parameters), or with `head_fp32` as stored (the fused head then computes in
    float32 over the 16-bit hidden states, without a copy of the weight). Under FSDP2 (`--fsdp`) a head still sharded here (a DTensor)
    is gathered once per micro-batch with `full_tensor()`, whose backward reduce-scatters the head's gradient
    into the sharded parameter (distributed.full_head); the root module's own unsharded head, which FSDP2 keeps
    from the forward to the backward, is used as it is."""
    head = model.get_output_embeddings()
    weight, bias = distributed.full_head(head.weight), distributed.full_head(head.bias)
    if head_fp32:
        return weight, bias
    return weight.to(dtype), None if bias is None else bias.to(dtype)


def head_transform(model) -> dict:
    """The fused head's softcap= / logit_scale= of this model, from its config (Gemma 2/3's
    final_logit_softcapping, Cohere's logit_scale, ...: erpo.ops.linear_logprobs_entropy.head_transform_from_config,
    TRL 1.16's reading)."""
    return head_transform_from_config(model.config)


def check_plain_head(model) -> dict:
    """The fused head computes transform(hidden @ W.T + b) with the config's soft cap and logit scale
    (head_transform); refuse a head that is not an nn.Linear, and a model whose logits are something else (a
    transform its config does not name), before training, instead of training on a different loss. Returns
    head_transform(model)."""
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(f"fused_head: the model's output embeddings are a {type(head).__name__}, not nn.Linear; "
                         "use --no-fused-head")
    transform = head_transform(model)
    device = head.weight.device
    ids = torch.arange(3, 11, device=device).remainder(head.weight.shape[0]).view(1, -1)
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
        hidden = out.hidden_states[-1].float()
        linear = (hidden @ head.weight.float().T + (0 if head.bias is None else head.bias.float())) * (
            transform["logit_scale"])
        if transform["softcap"] is not None:
            linear = transform["softcap"] * torch.tanh(linear / transform["softcap"])
        logits = out.logits.float()
    if not torch.allclose(linear, logits, rtol=1e-3, atol=1e-3 * float(logits.abs().max()) + 1e-6):
        raise ValueError(f"fused_head: this model's logits are not final hidden states @ lm_head.weight.T (+ bias) "
                         f"under its config's softcap={transform['softcap']} and logit_scale="
                         f"{transform['logit_scale']}; use --no-fused-head")
    return transform


@torch.no_grad()
def fixed_logprobs(model, batch: dict, chunk: int, temperature: float, autocast: bool,
                   fused_head: bool = False, support=None, head_fp32: bool = False) -> torch.Tensor:
    """Log-probs of the sampled tokens under a fixed model (rollout policy or reference), in chunks; over the
    sampler's truncated support when one is given (each model's own, recomputed from its logits)."""
    out = []
    for start in range(0, batch["targets"].shape[0], chunk):
        rows = slice(start, start + chunk)
        if fused_head:
            hidden = response_hidden(model, batch, rows, autocast)
            weight, bias = output_head(model, hidden.dtype, head_fp32)
            logp, _ = erpo.linear_logprobs_and_entropy(hidden, weight, batch["targets"][rows], bias,
                                                       temperature=temperature, support=support,
                                                       head_fp32=head_fp32, **head_transform(model))
        else:
            logits = response_logits(model, batch, rows, autocast)
            logp, _ = erpo.logprobs_and_entropy(logits, batch["targets"][rows], temperature=temperature, shift=True,
                                                support=support)
        out.append(logp)
    return torch.cat(out)


@torch.no_grad()
def policy_shift(policy, batch: dict, old_logp: torch.Tensor, chunk: int, cfg, autocast: bool) -> dict:
    """How far the step's updates moved the policy from the one that sampled, on the batch's tokens: the
    importance ratio of the updated policy (the most off-policy any mini-batch of the step can be).
    One extra no-grad forward per step."""
    new = fixed_logprobs(policy, batch, chunk, cfg.temperature, autocast, cfg.fused_head, loss_support(cfg),
                         cfg.head_fp32)
    valid = batch["mask"].bool()
    log_ratio = (new - old_logp)[valid].double()
    ratio = log_ratio.exp()
    return {"means": {"shift_ratio_std": float(ratio.std()) if ratio.numel() > 1 else 0.0,
                      "shift_kl": float((ratio - 1 - log_ratio).mean())},
            "extremes": {"shift_ratio_min": float(ratio.min()), "shift_ratio_max": float(ratio.max())}}


@dataclass
class Prepared:
    """One step's batch, fixed before its updates (Trainer.prepare)."""

    out: rollout_lib.Rollouts  # the sampled groups
    batch: dict  # packed token tensors (rollout.pack)
    rewards: torch.Tensor  # [n] the trained (shaped) rewards
    adv: object  # advantages.Advantages of the rewards
    steps: list  # the rows of each optimizer step's micro-batches
    chunk: int  # rows per no-grad forward
    tensors: dict  # advantages, group_ids, old_logp (and ref_logp): what the loss measures against
    collected: object  # dynamic_sampling's account of the rounds
    problems: list  # reward failures


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.lock = None  # the run directory's lock (rank 0), held while this trainer may write the run
        try:
            self._setup(cfg)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Give the run directory's lock back (the process exiting does it too)."""
        if self.lock is not None:
            os.close(self.lock)
            self.lock = None

    def __del__(self):
        self.release()

    def _setup(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.dist = distributed.setup(cfg.device)
        resume = checkpoint.resolve(cfg.resume) if cfg.resume else None
        if resume:
            checkpoint.verify(resume)  # before anything is loaded from it
            checkpoint.check_world(resume, self.dist.world)
        distributed.check_fsdp(cfg, self.dist)
        threads = cfg.threads or (1 if cfg.model == tiny_task.MODEL_NAME else 0)
        if threads:
            torch.set_num_threads(threads)
        self.device = self.dist.device
        self.autocast = self.device.type == "cuda" and cfg.bf16
        self.loss_cfg = loss_config(cfg)
        self.reward_fn = rewards_lib.resolve(cfg.reward)

        self.run_dir, self.lock = checkpoint.claim_run_dir(cfg.out_dir, cfg.overwrite, resume, self.dist)
        if cfg.rollout == "vllm":
            rollout_lib.require_vllm()  # before anything is written for it
        distributed.barrier(self.dist)  # every rank has checked the run dir before rank 0 writes into it

        self.rows, self.eval_rows = self._data()  # before the model: a bad data path fails in a second
        initial = None
        if resume:
            policy, self.tokenizer = model_lib.load_policy(os.path.join(resume, "model"), "", cfg.seed, 0)
        else:
            policy, self.tokenizer = model_lib.load_policy(cfg.model, cfg.tokenizer, cfg.seed, cfg.sft_warmup_steps)
            initial = policy
        self.ref = model_lib.load_reference(cfg.ref_model, self.loss_cfg.needs_ref, cfg.model, cfg.seed,
                                            cfg.sft_warmup_steps, initial)
        self.policy = policy.to(self.device)
        if cfg.fused_head:
            check_plain_head(self.policy)
        if self.ref is not None:
            self.ref.to(self.device)
        if self.loss_cfg.needs_ref and self.ref is None:
            raise ValueError("the loss needs reference log-probs but ref_model gave none")

        self.sampler = data.PromptSampler(len(self.rows), cfg.seed)
        self.model = distributed.wrap(self.policy, self.dist, cfg.fsdp)  # before the optimizer: FSDP swaps parameters
        self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=cfg.lr, betas=(0.9, cfg.adam_beta2),
                                           weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        # The loss's state (its controller, Clip-Cov's generator seeded per rank), checkpointed with the trainer's
        self.loss = PolicyLoss(self.loss_cfg.replace(seed=cfg.seed * 7919 + self.dist.rank))
        self.engine = self._engine()
        self.step = 0
        self.nonfinite_streak = 0

        # Every random draw of training (sampling, Clip-Cov picks) comes from here on; resuming restores it.
        checkpoint.seed_all(cfg.seed * 1000 + self.dist.rank)
        self.resumed_from = None
        if resume:
            self._load(resume)
            self.resumed_from = resume
            if cfg.steps < self.step:
                raise ValueError(f"--resume {cfg.resume!r}: steps={cfg.steps} is below the checkpoint's step "
                                 f"{self.step}; give --steps {self.step} or more")
        self.finished = resume is not None and self.step == cfg.steps
        self.log = None
        if self.dist.is_main and not self.finished:  # a finished run's files are left exactly as they are
            self.cfg = cfg = dataclasses.replace(cfg, out_dir=self.run_dir, overwrite=False)
            os.makedirs(self.run_dir, exist_ok=True)
            if self.lock is None:
                self.lock = checkpoint.lock_run(self.run_dir)
            save_config(cfg, os.path.join(self.run_dir, "train_config.json"))
            checkpoint.clean_temp(self.run_dir)
            self.log = metrics_lib.MetricsLog(os.path.join(self.run_dir, "metrics.jsonl"),
                                              self.step if resume else None)

    # --- setup helpers -----------------------------------------------------------------------------
    def _data(self):
        cfg = self.cfg
        rows = data.load(cfg.data, cfg.prompt_field, cfg.answer_field)
        if cfg.eval_data:
            return rows, data.load(cfg.eval_data, cfg.prompt_field, cfg.answer_field)
        if cfg.eval_holdout:
            return data.split_holdout(rows, cfg.eval_holdout, cfg.seed)
        if cfg.data == tiny_task.DATA_NAME:
            return rows, rows  # the task has only 100 problems: eval greedy accuracy on all of them
        return rows, []

    @property
    def controller(self):
        return self.loss.controller

    def _engine(self):
        if self.cfg.rollout == "hf":
            return rollout_lib.HFRollout(self.policy, self.tokenizer)
        path = os.path.join(self.run_dir, "vllm_init")
        if self.dist.is_main:
            hf_logging.disable_progress_bar()
            self.policy.save_pretrained(path)
            self.tokenizer.save_pretrained(path)
        distributed.barrier(self.dist)
        try:
            return rollout_lib.VLLMRollout(path, self.tokenizer, seed=self.cfg.seed + self.dist.rank)
        except BaseException:
            if self.dist.is_main:
                shutil.rmtree(path, ignore_errors=True)  # nothing of a failed engine start stays behind
            raise

    def _load(self, path: str) -> None:
        state = checkpoint.load_trainer_state(path)
        sharded = os.path.join(path, distributed.SHARDED_DIR)
        if os.path.isdir(sharded):  # written under FSDP: model and optimizer from the DCP shards
            distributed.load_sharded(self.policy, self.optimizer, sharded)
        elif self.cfg.fsdp:
            raise ValueError(f"checkpoint {path!r} was written without --fsdp (its optimizer state is not sharded); "
                             "resume it without --fsdp")
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.loss.set_extra_state({"controller": state["controller"],
                                   "generator": state["loss_generator"][self.dist.rank]})
        self.sampler.load_state_dict(state["sampler"])
        checkpoint.set_rng_state(state["rng"][self.dist.rank])
        self.step = state["step"]
        self.nonfinite_streak = state["nonfinite_streak"]

    def _save(self) -> None:
        rng = distributed.gather(checkpoint.rng_state(), self.dist)
        loss_state = self.loss.get_extra_state()
        generators = distributed.gather(loss_state["generator"], self.dist)
        # Under FSDP (collectives): the full weights gathered for model/ (what `erpo eval` and a new run load), and
        # the model and optimizer shards written by every rank into the checkpoint's temp dir (DCP).
        model_state = distributed.full_model_state(self.policy, self.dist, self.cfg.fsdp)
        tmp = None
        if self.cfg.fsdp:
            tmp = distributed.gather(checkpoint.temp_dir(self.run_dir, self.step) if self.dist.is_main else None,
                                     self.dist)[0]
            try:
                distributed.save_sharded(self.policy, self.optimizer, os.path.join(tmp, distributed.SHARDED_DIR))
            except Exception as err:  # DCP raises on every rank when any rank's write failed
                if self.dist.is_main:
                    shutil.rmtree(tmp, ignore_errors=True)
                raise self._write_failed(getattr(err, "strerror", None) or str(err).strip().splitlines()[-1]) from None
        if self.dist.is_main:
            state = {
                "step": self.step, "world": self.dist.world,
                "optimizer": None if self.cfg.fsdp else self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "sampler": self.sampler.state_dict(),
                "controller": loss_state["controller"],
                "rng": rng, "loss_generator": generators, "nonfinite_streak": self.nonfinite_streak,
            }
            try:
                checkpoint.save(self.run_dir, self.step, self.policy, self.tokenizer, state, self.cfg.to_dict(),
                                keep=self.cfg.keep_checkpoints, model_state=model_state, tmp=tmp)
            except OSError as err:
                raise self._write_failed(err.strerror or err) from None
        distributed.barrier(self.dist)

    def _write_failed(self, why) -> CheckpointWriteError:
        steps = checkpoint.list_steps(self.run_dir)
        intact = f"the latest intact checkpoint is step {steps[-1]}" if steps else "no checkpoint was written yet"
        return CheckpointWriteError(f"step {self.step}: writing the checkpoint failed ({why}); {intact}; fix the "
                                    f"cause and continue with `erpo train --resume {self.run_dir}`")

    # --- one step ----------------------------------------------------------------------------------
    def rollout(self):
        """Sample this rank's prompts and G completions each; score them."""
        cfg, d = self.cfg, self.dist
        picked = self.sampler.next_batch(cfg.prompts_per_step * d.world)[d.rank :: d.world]
        rows = [self.rows[i] for i in picked]
        prompts = [data.encode_prompt(self.tokenizer, r["prompt"], cfg.chat_template) for r in rows]
        out = self.engine.generate(prompts, cfg.group_size, cfg.max_new_tokens, cfg.temperature, cfg.top_p,
                                   cfg.top_k, cfg.min_p)
        texts = self.tokenizer.batch_decode(out.response_ids, skip_special_tokens=True)
        sample_rows = [r for r in rows for _ in range(cfg.group_size)]
        scores, problems = rewards_lib.score(self.reward_fn, texts, sample_rows, cfg.reward_timeout)
        scores = [s if done or cfg.score_truncated else 0.0 for s, done in zip(scores, out.finished)]
        return out, scores, problems

    def _draw_groups(self, problems: list) -> list:
        """One rollout round as groups, rewards shaped (DAPO overlong penalty when configured)."""
        cfg, g = self.cfg, self.cfg.group_size
        out, scores, new_problems = self.rollout()
        problems.extend(new_problems)
        lengths = [len(r) for r in out.response_ids]
        shaping = reward_shaping.overlong_penalties(lengths, cfg.max_new_tokens, cfg.overlong_buffer,
                                                    cfg.overlong_penalty)
        return [
            dynamic_sampling.Group(out.prompt_ids[i], out.response_ids[i : i + g], out.finished[i : i + g],
                                   [s + p for s, p in zip(scores[i : i + g], shaping[i : i + g])], scores[i : i + g])
            for i in range(0, len(out.prompt_ids), g)
        ]

    def sample_batch(self):
        """The step's training groups (dynamic sampling when configured) as Rollouts + rewards."""
        cfg, problems = self.cfg, []
        collected = dynamic_sampling.collect(
            lambda: self._draw_groups(problems), cfg.prompts_per_step, cfg.dynamic_sampling,
            cfg.dynamic_sampling_max_tries,
            lambda full: distributed.mean({"full": float(full)}, self.dist)["full"] == 1.0)
        groups = collected.groups
        out = rollout_lib.Rollouts([g.prompt_ids for g in groups for _ in g.response_ids],
                                   [r for g in groups for r in g.response_ids], [f for g in groups for f in g.finished])
        rewards = [r for g in groups for r in g.rewards]
        return out, rewards, collected, problems

    def _mini_batches(self, n_groups: int) -> list[list[slice]]:
        """Rows of each optimizer step's micro-batches: `mini_batches` runs of whole groups, each cut into
        micro-batches of `micro_batch_groups` groups."""
        cfg, g = self.cfg, self.cfg.group_size
        out = []
        for groups in torch.arange(n_groups).tensor_split(cfg.mini_batches):
            if not len(groups):  # fewer groups than mini-batches (validate() refuses it for configs)
                continue
            first, count = int(groups[0]), len(groups)
            per_micro = min(cfg.micro_batch_groups or count, count)
            out.append([slice((first + s) * g, (first + min(s + per_micro, count)) * g)
                        for s in range(0, count, per_micro)])
        return out

    def accumulate(self, batch: dict, tensors: dict, micro_rows: list, loss_cfg, sums: dict, share: float) -> float:
        """Forward and backward of one optimizer step's micro-batches, gradients accumulated (no optimizer
        step). Adds the loss metrics, token-weighted x `share`, into `sums`; returns the step's loss."""
        mask = batch["mask"]
        norm = normalizer.Normalizer.of(mask, micro_rows, self.dist)
        total_tokens = max(float(mask.sum()), 1.0)  # an all-masked step: metrics weigh 0, never 0 / 0
        step_loss = 0.0
        for index, rows in enumerate(micro_rows):
            sync = index == len(micro_rows) - 1
            context = distributed.no_sync(self.model, self.dist, sync)
            with context:
                micro = {"targets": batch["targets"][rows], "mask": mask[rows],
                         **{k: v[rows] for k, v in tensors.items()}, **norm.batch_keys()}
                if self.cfg.fused_head:
                    hidden = response_hidden(self.model, batch, rows, self.autocast)
                    weight, bias = output_head(self.policy, hidden.dtype, self.cfg.head_fp32)
                    result = erpo.linear_policy_loss(hidden, weight, micro, loss_cfg, bias=bias,
                                                     generator=self.loss.generator_for(hidden.device),
                                                     head_fp32=self.cfg.head_fp32, **head_transform(self.policy))
                else:
                    logits = response_logits(self.model, batch, rows, self.autocast)
                    result = policy_loss(logits, micro, loss_cfg, generator=self.loss.generator_for(logits.device),
                                         shift=True)
                scale = norm.loss_scale
                (result.loss * scale).backward()
            step_loss += float(result.loss.detach()) * scale  # averaged over ranks: the step's global loss
            weight = float(mask[rows].sum()) / total_tokens * share
            for key, value in result.metrics.items():
                if key.endswith(("_min", "_max")):  # extremes (ratio_min/max) over the micro-batches
                    pick = min if key.endswith("_min") else max
                    sums[key] = pick(sums.get(key, float(value)), float(value))
                elif key.startswith("n_"):  # counts: of the whole batch, once per pass over it
                    sums[key] = sums.get(key, 0.0) + float(value) * share
                elif value.is_floating_point():
                    sums[key] = sums.get(key, 0.0) + float(value) * weight
        return step_loss

    def prepare(self, loss_cfg) -> "Prepared":
        """Sample the step's batch and fix everything the updates measure against: advantages, the old
        (sampling-time) and reference log-probs, and the rows of each optimizer step."""
        cfg = self.cfg
        out, scores, collected, problems = self.sample_batch()
        batch = rollout_lib.pack(out, self.tokenizer.pad_token_id, self.device)
        n = batch["targets"].shape[0]
        rewards = torch.tensor(scores, dtype=torch.float32, device=self.device)
        group_ids = torch.arange(n, device=self.device) // cfg.group_size
        adv = advantages_lib.compute(loss_cfg.adv_estimator, rewards, group_ids)
        steps = self._mini_batches(n // cfg.group_size)
        chunk = max(rows.stop - rows.start for micro in steps for rows in micro)
        # Fixed at sampling time: every mini-batch and epoch measures its ratio against the sampling policy.
        tensors = {"advantages": adv.advantages, "group_ids": group_ids,
                   "old_logp": fixed_logprobs(self.policy, batch, chunk, cfg.temperature, self.autocast,
                                              cfg.fused_head, loss_support(cfg), cfg.head_fp32)}
        if loss_cfg.needs_ref:
            tensors["ref_logp"] = fixed_logprobs(self.ref, batch, chunk, cfg.temperature, self.autocast,
                                                 cfg.fused_head, loss_support(cfg), cfg.head_fp32)
        return Prepared(out, batch, rewards, adv, steps, chunk, tensors, collected, problems)

    def train_step(self) -> dict:
        cfg = self.cfg
        loss_cfg = self.loss.current_config()
        start = time.perf_counter()
        step = self.prepare(loss_cfg)
        out, batch, rewards, adv, steps, chunk, tensors = (step.out, step.batch, step.rewards, step.adv, step.steps,
                                                           step.chunk, step.tensors)
        collected, problems = step.collected, step.problems
        n = batch["targets"].shape[0]
        sums, nonfinite_steps, grad_norms, losses = {}, 0, [], []
        updates = cfg.ppo_epochs * len(steps)
        self.model.train()
        for _ in range(cfg.ppo_epochs):
            for micro_rows in steps:
                step_loss = self.accumulate(batch, tensors, micro_rows, loss_cfg, sums, 1.0 / cfg.ppo_epochs)
                losses.append(step_loss)
                grad_norm, skipped = self._optimizer_step(step_loss)
                grad_norms.append(grad_norm)
                nonfinite_steps += int(skipped)
        self.scheduler.step()
        self.step += 1
        sums["loss"] = sum(losses) / updates  # mean over the step's optimizer steps

        task_rewards = [r for g in collected.sampled for r in g.task_rewards]
        sampling = {"reward": sum(task_rewards) / len(task_rewards), "reward_trained": float(rewards.mean())}
        shift = policy_shift(self.policy, batch, tensors["old_logp"], chunk, cfg, self.autocast)
        extremes = {k: sums.pop(k) for k in list(sums) if k.endswith(("_min", "_max"))}
        shared = distributed.mean({**sums, **sampling, **shift["means"]}, self.dist)
        shared.update(distributed.extremes({**extremes, **shift["extremes"]}, self.dist))
        if not nonfinite_steps:
            self.loss.step_controller(shared)  # reads the batch's mean entropy (averaged over ranks)
        self.engine.sync_weights(self.policy)
        elapsed = time.perf_counter() - start
        lengths = [len(r) for r in out.response_ids]
        record = {
            "step": self.step, **shared, "reward_std": float(rewards.std()) if n > 1 else 0.0,
            "response_len": sum(lengths) / len(lengths), "truncated_frac": 1 - sum(out.finished) / n,
            "degenerate_groups": int(adv.n_degenerate_groups),
            "grad_norm": next((g for g in grad_norms if not math.isfinite(g)), max(grad_norms)),
            "optimizer_steps": updates, "lr": self.scheduler.get_last_lr()[0], "nonfinite": nonfinite_steps,
            "reward_errors": len(problems), "step_time": elapsed,
            "tokens_per_s": sum(lengths) * self.dist.world / elapsed,
        }
        if cfg.dynamic_sampling:
            record.update({"sampling_tries": collected.tries, "dropped_groups": collected.dropped,
                           "filler_groups": collected.filler})
        return record, problems

    def _optimizer_step(self, loss_value: float):
        """Clip and step, unless the loss or the gradient is NaN/inf (then skip, and report it)."""
        cfg = self.cfg
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        norm = float(torch.nn.utils.clip_grad_norm_(self.policy.parameters(), max_norm))
        bad = distributed.mean({"bad": float(not (math.isfinite(norm) and math.isfinite(loss_value)))}, self.dist)
        nonfinite = bad["bad"] > 0
        if nonfinite:
            self.optimizer.zero_grad(set_to_none=True)
            self.nonfinite_streak += 1
            where = f"step {self.step + 1}: non-finite {'loss' if not math.isfinite(loss_value) else 'gradient'} " \
                    f"(loss {loss_value}, grad norm {norm})"
            if cfg.on_nonfinite == "stop" or self.nonfinite_streak >= cfg.max_nonfinite:
                steps = checkpoint.list_steps(self.run_dir)
                kept = f"checkpoints up to step {steps[-1]} are intact" if steps else "no checkpoint was written"
                raise NonFiniteError(f"{where}; stopping (on_nonfinite={cfg.on_nonfinite!r}, "
                                     f"{self.nonfinite_streak} in a row, max_nonfinite={cfg.max_nonfinite}); {kept} "
                                     f"(erpo train --resume {self.run_dir} continues from there)")
            self._report(f"[yellow]{where}: update skipped[/]")
            return norm, True
        self.nonfinite_streak = 0
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm, False

    def _report(self, message: str) -> None:
        if getattr(self, "progress", None) is not None:
            self.progress.log(message)
        else:
            print(message)

    def _report_problems(self, problems: list[dict]) -> None:
        for p in problems[:3]:
            self._report(f"[yellow]step {self.step}: reward failed ({p['error']}) and scored 0 for prompt "
                         f"{p['prompt'][:80]!r}, completion {p['completion'][:80]!r}[/]")
        if len(problems) > 3:
            self._report(f"[yellow]step {self.step}: {len(problems) - 3} more reward failures[/]")

    def run_eval(self) -> dict:
        """Greedy pass@1 (by default) on the eval rows. Under FSDP every rank calls it and generates the whole eval
        set in the same batches as one process (a sharded forward all-gathers each layer from every rank, and
        `generate` keeps the ranks in step with synced_gpus), so the figure is the one process's: each rank's
        rows are the same, its full weights the same gathered ones. It costs each rank the whole set's decoding;
        splitting the rows over the ranks would not, but changes the batches and so could flip a greedy near-tie."""
        if not self.eval_rows:
            return {}
        cfg = self.cfg
        return evaluate(self.engine, self.tokenizer, self.eval_rows, self.reward_fn, chat_template=cfg.chat_template,
                        max_new_tokens=cfg.max_new_tokens, temperature=cfg.eval_temperature,
                        reward_timeout=cfg.reward_timeout, score_truncated=cfg.score_truncated)

    # --- the loop ----------------------------------------------------------------------------------
    def train(self) -> list[dict]:
        cfg, main = self.cfg, self.dist.is_main
        history = []
        if self.finished:
            if main:
                print(f"run {self.run_dir} is already complete: its checkpoint is at step {self.step} of steps="
                      f"{cfg.steps}; nothing to train (give --steps N larger than {self.step} to extend it)")
            distributed.cleanup(self.dist)
            return history
        try:
            self._loop(history)
        except KeyboardInterrupt:
            raise RunInterrupted(self._interrupted()) from None
        if main:
            summary = metrics_lib.reward_summary(os.path.join(self.run_dir, "metrics.jsonl"))
            if summary:
                print(summary)
        if main and cfg.plots:
            plots.plot_run(self.run_dir)
        distributed.cleanup(self.dist)
        return history

    def _interrupted(self) -> str:
        steps = checkpoint.list_steps(self.run_dir)
        if not steps:
            return (f"interrupted at step {self.step} of {self.cfg.steps}, before the run's first checkpoint; start "
                    f"it again with `erpo train --out-dir {self.run_dir} --overwrite` and the same options")
        latest = os.path.join(self.run_dir, "checkpoints", f"step_{steps[-1]:06d}")
        return (f"interrupted at step {self.step} of {self.cfg.steps}; the latest checkpoint is {latest}; continue "
                f"with `erpo train --resume {self.run_dir}`")

    def _loop(self, history: list) -> None:
        cfg, main = self.cfg, self.dist.is_main
        warned_degenerate = False
        with metrics_lib.LiveProgress(cfg.steps, self.step, cfg.progress and main) as self.progress:
            if main:
                start = (f"resumed from {self.resumed_from} at step {self.step} of {cfg.steps}"
                         if self.resumed_from else f"new run, {cfg.steps} steps")
                self._report(f"run dir {self.run_dir}; {start}; loss {self.loss_cfg.method}; "
                             f"world {self.dist.world}; device {self.device}")
                warning = offpolicy.on_policy_warning(cfg, self.loss_cfg)
                if warning:
                    self._report(f"[yellow]warning: {warning}[/]")
            # Under FSDP every rank evaluates (a sharded model's forward needs them all; see run_eval); rank 0 logs.
            evaluates = main or cfg.fsdp
            if cfg.eval_every and self.step == 0 and evaluates:  # the "before" figure of a fresh run
                before = {"step": 0, **self.run_eval()}
                if main:
                    self.log.write(before)
                    self.progress.update(0, before)
            while self.step < cfg.steps:
                record, problems = self.train_step()
                self._report_problems(problems)
                if main and not warned_degenerate and record["degenerate_groups"] == cfg.prompts_per_step:
                    warned_degenerate = True
                    self._report(f"[yellow]warning: step {self.step}: every group's rewards were equal (all right or "
                                 "all wrong), so every advantage was 0 and the policy term gave no gradient; a run "
                                 "where this persists learns nothing (shown once; see degenerate_groups)[/]")
                last = self.step == cfg.steps
                if cfg.eval_every and (self.step % cfg.eval_every == 0 or last) and evaluates:
                    record.update(self.run_eval())
                if main:
                    self.log.write(record)
                    self.progress.update(self.step, record)
                history.append(record)
                if (cfg.save_every and self.step % cfg.save_every == 0) or last:
                    self._save()


def train(cfg: TrainConfig) -> list[dict]:
    trainer = Trainer(cfg)
    try:
        return trainer.train()
    finally:
        trainer.release()
