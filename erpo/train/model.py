"""Loading the policy, its tokenizer and the reference model."""
import copy

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from erpo.train import tiny_task


def load_policy(source: str, tokenizer_source: str, seed: int, sft_warmup_steps: int):
    """`source` is 'tiny' (built in code, then warmed up) or a local path / hub name of a causal LM."""
    if source == tiny_task.MODEL_NAME:
        tokenizer = tiny_task.build_tokenizer()
        model = tiny_task.build_model(tokenizer)
        if sft_warmup_steps:
            tiny_task.warm_up(model, tokenizer, steps=sft_warmup_steps, seed=seed)
        return model, tokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_source or source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    except OSError as err:
        raise ValueError(f"cannot load model {source!r}: {err}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # responses are cut at the first EOS, so pad == EOS is safe
    tokenizer.padding_side = "left"
    return model, tokenizer


def frozen_copy(model):
    ref = copy.deepcopy(model).eval()
    ref.requires_grad_(False)
    return ref


def load_reference(spec: str, needs_ref: bool, config_model: str, seed: int, sft_warmup_steps: int, initial_policy):
    """The reference policy, or None.

    'auto': the initial policy when the loss needs one; 'init': always; 'none': never (an error if the loss
    needs it); anything else: a model path. On resume the initial policy is rebuilt from the config (the
    built-in task's warm-up is deterministic), never taken from the trained checkpoint.
    """
    if spec == "none":
        if needs_ref:
            raise ValueError("ref_model='none' but the loss needs reference log-probs (KL term or ERPO eta != 0)")
        return None
    if spec == "auto" and not needs_ref:
        return None
    if spec in ("auto", "init"):
        if initial_policy is not None:
            return frozen_copy(initial_policy)
        model, _ = load_policy(config_model, "", seed, sft_warmup_steps)
        return frozen_copy(model)
    model, _ = load_policy(spec, "", seed, 0)
    return frozen_copy(model)
