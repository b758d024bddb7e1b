"""Training configuration: one flat dataclass, loaded from YAML/TOML and overridden by command-line flags.

Precedence: dataclass defaults < config file < flags. Every field is a flag (`--group-size 8`); loss knobs
(`erpo.LossConfig(**knobs)`) go in `loss_args` (`--loss-arg gamma=5`). An unknown key is an error naming it.
"""
import argparse
import dataclasses
import json
import os
import tomllib
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from erpo.hints import did_you_mean
from erpo.losses.config import METHODS


def _f(default, help: str, **kw):
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # What to train on
    model: str = _f("tiny", "policy: 'tiny' (built-in 132k-param Llama, no download), a local path, or a hub name")
    tokenizer: str = _f("", "tokenizer path or name; empty = same as model")
    data: str = _f("tiny:add1", "training prompts: 'tiny:add1' (built-in task), a .jsonl file or a saved `datasets` dir")
    eval_data: str = _f("", "held-out prompts (same formats); empty = `eval_holdout` rows split off `data`")
    eval_holdout: int = _f(0, "rows held out of `data` for eval when `eval_data` is empty (0 with the built-in task: it evaluates on all 100 problems)")
    prompt_field: str = _f("prompt", "field holding the prompt in each row")
    answer_field: str = _f("answer", "field holding the reference answer in each row")
    chat_template: bool = _f(True, "render prompts with the tokenizer's chat template when it has one")
    reward: str = _f("exact_match", "'exact_match', 'math_verify', or a Python function 'module:function'(completion, answer, row) -> float")
    reward_timeout: float = _f(5.0, "seconds one reward call may take before it is scored 0 and reported (0 = no limit)")
    score_truncated: bool = _f(False, "score responses cut at max_new_tokens without EOS (else they get reward 0)")
    overlong_buffer: int = _f(0, "DAPO overlong reward shaping: the last N tokens before max_new_tokens cost a linearly growing penalty, up to overlong_penalty at max_new_tokens (0 = off)")
    overlong_penalty: float = _f(1.0, "DAPO overlong shaping: the penalty of a response of max_new_tokens tokens")
    dynamic_sampling: bool = _f(False, "DAPO dynamic sampling: drop groups whose rewards are all equal (no advantage) and sample more prompts until the batch is full")
    dynamic_sampling_max_tries: int = _f(4, "rollout rounds per step under dynamic_sampling; a batch still short after them is filled with dropped groups (reported as filler_groups)")
    # Rollouts
    rollout: str = _f("hf", "rollout backend: 'hf' (transformers generate) or 'vllm'")
    prompts_per_step: int = _f(16, "prompts sampled per step (per process under torchrun)")
    group_size: int = _f(16, "completions per prompt (G)")
    max_new_tokens: int = _f(5, "longest response in tokens")
    temperature: float = _f(1.0, "sampling temperature; the loss uses the same one")
    top_p: float = _f(1.0, "nucleus sampling threshold (1 = off)")
    top_k: int = _f(0, "sample from the top_k most likely tokens only (0 = off)")
    min_p: float = _f(0.0, "sample only tokens of probability >= min_p x the most likely one's (0 = off)")
    support_loss: bool = _f(True, "score the loss and the old/ref log-probs against the truncated distribution the rollouts sampled from (top_k/top_p/min_p; docs/support.md); --no-support-loss scores the full vocabulary")
    # Loss and updates
    loss: str = _f("grpo", "policy-loss method, one of erpo.LossConfig's presets: " + ", ".join(METHODS))
    loss_args: dict = _f({}, "extra erpo.LossConfig knobs, e.g. --loss-arg gamma=5 (repeatable)")
    fused_head: bool = _f(True, "policy loss and old/ref log-probs straight from the final hidden states and the LM head (erpo.linear_policy_loss): the [tokens, vocab] logits are never stored; --no-fused-head takes the logits path")
    head_fp32: bool = _f(False, "fused head in float32 over 16-bit hidden states (TRL's cast_lm_head_to_fp32): the head's products and dlogits in fp32, the weight used as stored (no cast to the hidden states' dtype, no fp32 copy)")
    ref_model: str = _f("auto", "reference model for KL / ERPO progress: 'auto' (a frozen copy of the initial policy when the loss needs one), 'none', 'init', or a path")
    mini_batches: int = _f(4, "optimizer steps per rollout batch and epoch: the batch's groups split into this many mini-batches of whole groups (sizes differ by at most one group) (verl's ppo_mini_batch_size, TRL's steps_per_generation); 1 with ppo_epochs 1 = fully on-policy, where ratios are 1 and clipping cannot act")
    ppo_epochs: int = _f(1, "passes over each rollout batch (each pass takes `mini_batches` optimizer steps); old log-probs stay those of the sampling policy")
    micro_batch_groups: int = _f(0, "groups per forward/backward micro-batch, gradients accumulated within a mini-batch (0 = the whole mini-batch)")
    lr: float = _f(5e-4, "AdamW learning rate")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    adam_beta2: float = _f(0.99, "AdamW beta2 (beta1 = 0.9)")
    lr_schedule: str = _f("constant", "'constant', 'linear' or 'cosine' decay to 0 after warm-up")
    lr_warmup_steps: int = _f(0, "linear LR warm-up steps")
    grad_clip: float = _f(1.0, "max gradient norm (0 = no clipping; the norm is still checked for NaN/inf)")
    on_nonfinite: str = _f("skip", "NaN/inf loss or gradient: 'skip' the update (and report it) or 'stop' the run")
    max_nonfinite: int = _f(5, "consecutive skipped updates after which the run stops anyway")
    # Schedule and output
    steps: int = _f(600, "RL steps (one rollout batch each)")
    seed: int = _f(0, "seed of data order, sampling and model init")
    sft_warmup_steps: int = _f(40, "supervised warm-up steps before RL (built-in task only)")
    out_dir: str = _f("", "run directory (metrics, checkpoints, plots); empty = runs/<date-time>")
    resume: str = _f("", "continue from a run directory (its latest checkpoint) or one checkpoint directory; the run's saved config is restored (only RESUME_CHANGEABLE keys may be given with a new value)")
    overwrite: bool = _f(False, "replace the run already in out_dir (its checkpoints, metrics, config and plot are deleted first); without it an existing run is never touched")
    save_every: int = _f(100, "checkpoint every K steps (and at the end; 0 = only at the end)")
    keep_checkpoints: int = _f(2, "checkpoints kept (oldest deleted; 0 = keep all)")
    eval_every: int = _f(100, "evaluate pass@1 on the held-out prompts every K steps (and at the end; 0 = never)")
    eval_temperature: float = _f(0.0, "eval sampling temperature (0 = greedy)")
    progress: bool = _f(True, "show the rich progress bar (rank 0)")
    plots: bool = _f(True, "write PNG plots of the metrics at the end")
    device: str = _f("auto", "'auto' (cuda if available), 'cpu', 'cuda'")
    bf16: bool = _f(True, "bf16 autocast on GPU (ignored on CPU)")
    fsdp: bool = _f(False, "under torchrun, shard parameters, gradients and optimizer state over the processes (FSDP2 fully_shard) instead of replicating them (DDP); needs --no-fused-head and --eval-every 0 (docs/trainer.md)")
    threads: int = _f(0, "torch CPU threads (0 = 1 for the built-in tiny model, whose small matmuls only lose to thread overhead; torch's default otherwise)")

    def validate(self) -> None:
        positive = ("prompts_per_step", "group_size", "max_new_tokens", "ppo_epochs", "steps", "max_nonfinite",
                    "mini_batches", "dynamic_sampling_max_tries")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"config: {name} must be >= 1, got {getattr(self, name)}")
        for name in ("micro_batch_groups", "save_every", "eval_every", "keep_checkpoints", "eval_holdout",
                     "sft_warmup_steps", "lr_warmup_steps", "threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"config: {name} must be >= 0, got {getattr(self, name)}")
        if self.loss not in METHODS:
            raise ValueError(f"config: loss {self.loss!r} is not a preset{did_you_mean(self.loss, METHODS)}; the "
                             f"presets: {', '.join(METHODS)}")
        if self.group_size < 2:
            raise ValueError("config: group_size must be >= 2: every advantage is relative to its group's other "
                             f"completions, so with {self.group_size} per prompt each is 0 and nothing trains")
        if not self.temperature > 0:
            raise ValueError(f"config: temperature must be > 0 (the loss divides by it), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"config: top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0 or not 0 <= self.min_p < 1:
            raise ValueError(f"config: top_k must be >= 0 (0 = off) and min_p in [0, 1), got {self.top_k} and {self.min_p}")
        if self.rollout == "hf" and self.top_p < 1 and self.min_p > 0:
            raise ValueError("config: top_p with min_p under rollout 'hf': transformers applies min-p after top-p, vLLM "
                             "(whose order the loss's support follows) before it, so the two sets differ; use one")
        choices = {"rollout": ("hf", "vllm"), "lr_schedule": ("constant", "linear", "cosine"),
                   "on_nonfinite": ("skip", "stop"), "device": ("auto", "cpu", "cuda")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"config: {name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.mini_batches > self.prompts_per_step:
            raise ValueError(f"config: mini_batches ({self.mini_batches}) exceeds prompts_per_step "
                             f"({self.prompts_per_step}): each optimizer step takes at least one whole group")
        if self.overlong_buffer < 0 or self.overlong_buffer >= self.max_new_tokens and self.overlong_buffer:
            raise ValueError(f"config: overlong_buffer must be in [0, max_new_tokens) = [0, {self.max_new_tokens}), "
                             f"got {self.overlong_buffer}")
        if self.overlong_penalty < 0:
            raise ValueError(f"config: overlong_penalty must be >= 0, got {self.overlong_penalty}")
        if self.lr <= 0 or self.grad_clip < 0 or self.reward_timeout < 0 or self.eval_temperature < 0:
            raise ValueError("config: lr must be > 0; grad_clip, reward_timeout, eval_temperature must be >= 0")

    @property
    def support(self):
        """The sampler's truncation as an erpo.Support, or None when it keeps the whole vocabulary."""
        from erpo.ops.support_config import Support

        support = Support(self.top_k or None, self.top_p if self.top_p < 1 else None, self.min_p or None)
        return None if support.is_full() else support

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}

# What a resume may change: how long the run goes on and how it reports, never what or how it trains.
# (`steps` may only grow; `out_dir` may name a fresh directory to continue into.)
RESUME_CHANGEABLE = ("steps", "eval_every", "save_every", "keep_checkpoints", "progress", "plots", "threads",
                     "on_nonfinite", "max_nonfinite", "out_dir", "resume", "overwrite")
_TYPES = typing.get_type_hints(TrainConfig)
BEFORE_THE_KEY_EXISTED = {"mini_batches": 1, "support_loss": False}  # earlier runs scored the full vocabulary


# Names TRL / transformers give the same setting: a config written for them gets our name back in the error.
PEER_NAMES = {
    "learning_rate": "lr", "num_generations": "group_size", "max_completion_length": "max_new_tokens",
    "max_steps": "steps", "output_dir": "out_dir", "loss_type": "loss", "num_iterations": "ppo_epochs",
    "max_grad_norm": "grad_clip", "save_steps": "save_every", "eval_steps": "eval_every",
    "save_total_limit": "keep_checkpoints", "warmup_steps": "lr_warmup_steps", "lr_scheduler_type": "lr_schedule",
    "model_name_or_path": "model", "resume_from_checkpoint": "resume",
}


def _unknown(key: str, where: str) -> ValueError:
    return ValueError(f"{where}: unknown config key {key!r}{did_you_mean(key, FIELDS, PEER_NAMES)}; "
                      "`erpo train --help` lists them all")


def _coerce(name: str, value: Any, where: str) -> Any:
    kind = _TYPES[name]
    article = "an" if kind.__name__[0] in "aeiou" else "a"
    if kind is not bool and isinstance(value, bool):
        raise ValueError(f"{where}: {name} must be {article} {kind.__name__}, got the bool {value!r}")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is dict and value is None:
        return {}
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"{where}: {name} must be {article} {kind.__name__}, got {value!r} ({type(value).__name__})")
    return value


RECIPES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recipes")


def recipes() -> list[str]:
    """Names of the built-in recipes (erpo/train/recipes/<name>.yaml), usable as `--config <name>`."""
    return sorted(name[:-5] for name in os.listdir(RECIPES_DIR) if name.endswith(".yaml"))


def resolve_config(path: str) -> str:
    """A config path as given, or a built-in recipe name (no extension, no folder) mapped to its file."""
    if os.sep not in path and "." not in path:
        if path in recipes():
            return os.path.join(RECIPES_DIR, path + ".yaml")
        if not os.path.exists(path):
            raise ValueError(f"config {path!r} is neither a file nor a built-in recipe {recipes()}"
                             f"{did_you_mean(path, recipes())}")
    return path


def load_file(path: str) -> dict:
    """Read a YAML (.yaml/.yml) or TOML (.toml) file, or a built-in recipe by name, into a dict of checked keys."""
    path = resolve_config(path)
    if not os.path.isfile(path):
        raise ValueError(f"config file {path!r} does not exist")
    with open(path, "rb") as handle:
        raw = handle.read()
    try:
        if path.endswith(".toml"):
            data = tomllib.loads(raw.decode("utf-8"))
        elif path.endswith((".yaml", ".yml", ".json")):
            data = yaml.safe_load(raw) or {}
        else:
            raise ValueError(f"config file {path!r}: use a .yaml, .yml, .toml or .json file")
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as err:
        raise ValueError(f"config file {path!r} does not parse: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path!r} must hold a mapping of keys, got {type(data).__name__}")
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in FIELDS:
            raise _unknown(str(key), f"config file {path!r}")
        out[name] = _coerce(name, value, f"config file {path!r}")
    return out


def parse_loss_arg(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"--loss-arg expects key=value, got {text!r}")
    return key.strip(), yaml.safe_load(value)  # YAML typing: 0.2 -> float, true -> bool, x -> str


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per field; defaults are SUPPRESS so only the flags given override the file."""
    parser.add_argument("--config", help="YAML or TOML file of config keys (flags override it), or the name of a "
                        f"built-in recipe: {', '.join(recipes())}")
    for name, fld in FIELDS.items():
        flag = "--" + name.replace("_", "-")
        default = fld.default if fld.default is not dataclasses.MISSING else fld.default_factory()
        help_text = f"{fld.metadata['help']} [default: {default!r}]"
        kind = _TYPES[name]
        if name == "loss_args":
            parser.add_argument("--loss-arg", dest="loss_args", action="append", metavar="KEY=VALUE",
                                default=argparse.SUPPRESS, help=help_text)
        elif kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=help_text, metavar=kind.__name__.upper())


def from_args(args: argparse.Namespace) -> TrainConfig:
    values = load_file(args.config) if getattr(args, "config", None) else {}
    for name in FIELDS:
        if hasattr(args, name):
            value = getattr(args, name)
            if name == "loss_args":
                value = {**values.get("loss_args", {}), **dict(parse_loss_arg(t) for t in value)}
            values[name] = value
    if values.get("resume"):
        values = resumed_values(values)
    config = TrainConfig(**values)
    config.validate()
    return config


def resumed_values(given: dict) -> dict:
    """The config of a resumed run: the checkpoint's saved config, with the given keys that may change.

    A given key whose value differs from the saved one and is not in RESUME_CHANGEABLE is refused, naming
    the key and both values: a resume never silently trains something other than the run it continues.
    """
    from erpo.train import checkpoint

    path = checkpoint.resolve(given["resume"])
    config_path = os.path.join(path, "train_config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"--resume {given['resume']!r}: checkpoint {path!r} has no train_config.json")
    try:
        with open(config_path, encoding="utf-8") as handle:
            saved = json.load(handle)
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"--resume {given['resume']!r}: cannot read {config_path!r} ({err})") from None
    saved = {k: v for k, v in saved.items() if k in FIELDS}  # keys of older versions are ignored
    # Keys newer than the run: the value that reproduces how it trained (before `mini_batches` existed every
    # rollout batch was one optimizer step), not today's default.
    saved = {**BEFORE_THE_KEY_EXISTED, **saved}
    values = dict(from_dict(saved, f"saved config {config_path!r}").to_dict())
    # Where the run lives now is where the checkpoint is (runs may be moved or copied); --overwrite never
    # carries over from the saved config.
    values["out_dir"], values["overwrite"] = "", False
    if "steps" in given and given["steps"] != values["steps"] and values["lr_schedule"] != "constant":
        raise ValueError(
            f"--resume {given['resume']!r}: steps {values['steps']} -> {given['steps']} would reshape the run's "
            f"lr_schedule {values['lr_schedule']!r} mid-run; only runs with lr_schedule 'constant' change their steps"
        )
    for key, value in given.items():
        if key in RESUME_CHANGEABLE or value == values[key]:
            values[key] = value
            continue
        raise ValueError(
            f"--resume {given['resume']!r}: {key} is {values[key]!r} in the run but {value!r} was given; a resume "
            f"may only change {', '.join(k for k in RESUME_CHANGEABLE if k not in ('resume', 'out_dir', 'overwrite'))}"
            f" (to train differently from these weights, start a new run with --model {os.path.join(path, 'model')})"
        )
    return values


def from_dict(values: dict, where: str = "config") -> TrainConfig:
    for key in values:
        if key not in FIELDS:
            raise _unknown(key, where)
    config = TrainConfig(**{k: _coerce(k, v, where) for k, v in values.items()})
    config.validate()
    return config


def save(config: TrainConfig, path: str) -> None:
    """Write the config atomically: a kill mid-write leaves the previous file, never half of one."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(config.to_dict(), handle, indent=2, sort_keys=True)
    os.replace(tmp, path)
