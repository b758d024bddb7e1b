"""Loading the policy, its tokenizer and the reference model."""
import copy
import os
import re
import socket
import urllib.parse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from erpo.train import tiny_task

# erpo's own progress owns the terminal: no "Loading weights" / "Writing model shards" bars on stderr from
# transformers, whose loads and saves happen at start, at eval and at every checkpoint.
hf_logging.disable_progress_bar()

HUB_HOST = "huggingface.co"
HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _hub_reachable(timeout: float = 3.0) -> bool:
    endpoint = urllib.parse.urlsplit(os.environ.get("HF_ENDPOINT", f"https://{HUB_HOST}"))
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((endpoint.hostname or HUB_HOST, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def locate(source: str, what: str = "model") -> dict:
    """Where `source` loads from, found before any loading starts, or a ValueError saying what was tried.

    A local directory must hold a transformers `config.json`; a hub name is looked up in the local cache
    first, then on the hub only when it is reachable (a 3-second probe, not a minute of retries) and
    HF_HUB_OFFLINE is not set. Returns the from_pretrained keyword arguments to use.
    """
    marker = "config.json" if what == "model" else "tokenizer_config.json"
    if os.path.isdir(source):
        if not os.path.isfile(os.path.join(source, marker)):
            raise ValueError(f"{what} {source!r} is a directory without {marker}: not a saved transformers {what} "
                             f"(save one with `{what}.save_pretrained(dir)`)")
        return {}
    looks_local = source.startswith((".", "/", "~")) or source.count("/") > 1  # hub names are 'name' or 'org/name'
    if looks_local or not HUB_REPO_ID.match(source):
        raise ValueError(f"{what} {source!r}: no such local directory (and not a hub name like 'org/name')")
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = isinstance(try_to_load_from_cache(source, marker), str)
    except Exception:  # an unusual cache layout: fall through to the hub rules below
        cached = False
    if cached:
        return {"local_files_only": True} if _offline() or not _hub_reachable() else {}
    tried = f"tried: local directory {source!r} (none), the local Hugging Face cache (not there)"
    if _offline():
        raise ValueError(f"{what} {source!r} cannot be loaded with HF_HUB_OFFLINE set; {tried}")
    if not _hub_reachable():
        raise ValueError(f"{what} {source!r} cannot be loaded: {tried}, {HUB_HOST} (unreachable within 3 s)")
    return {}


def load_policy(source: str, tokenizer_source: str, seed: int, sft_warmup_steps: int):
    """`source` is 'tiny' (built in code, then warmed up) or a local path / hub name of a causal LM."""
    if source == tiny_task.MODEL_NAME:
        if tokenizer_source:
            raise ValueError(f"tokenizer {tokenizer_source!r} with model 'tiny': the built-in model has its own "
                             "character tokenizer; drop --tokenizer")
        tokenizer = tiny_task.build_tokenizer()
        model = tiny_task.build_model(tokenizer)
        if sft_warmup_steps:
            tiny_task.warm_up(model, tokenizer, steps=sft_warmup_steps, seed=seed)
        return model, tokenizer
    model_kwargs = locate(source, "model")
    tokenizer_kwargs = locate(tokenizer_source, "tokenizer") if tokenizer_source else model_kwargs
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_source or source, **tokenizer_kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **model_kwargs)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"cannot load model {source!r}: {first}") from None
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
    try:
        model, _ = load_policy(spec, "", seed, 0)
    except ValueError as err:
        raise ValueError(f"ref_model: {err}") from None
    return frozen_copy(model)
