"""The inputs every case of one shape sees: rebuilt from the same seed in each worker, so all cases of a run
time and measure exactly the same numbers.

The logits are regenerated for every timed call (outside the timer): an in-place backward consumes them, and a
fresh tensor also keeps the caches honest. Loss batches follow the layout of erpo.policy_loss: [B, L] per-token
tensors, [B] per-sequence tensors, groups of GROUP_SIZE responses.
"""
from dataclasses import dataclass

import torch

LOGIT_STD = 2.0  # spread of real LM logits: peaked enough that the softmax is not flat
GROUP_SIZE = 4
MAX_SEQUENCES = 8
LOGP_NOISE = 0.05  # old/ref policies a little off the current one, so ratios sit near 1 as in training


@dataclass(frozen=True)
class Shape:
    n_tokens: int
    vocab: int
    dtype: str  # "float32" | "bfloat16" | "float16"
    hidden_size: int = 1024  # H of the "linear" kind (hidden [N, H], weight [V, H]); unused by the others

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def sequences(self) -> int:
        """B of the [B, L, V] loss layout: MAX_SEQUENCES responses when N splits evenly, else one."""
        return MAX_SEQUENCES if self.n_tokens % MAX_SEQUENCES == 0 else 1

    @property
    def element_bytes(self) -> int:
        return torch.empty((), dtype=self.torch_dtype).element_size()


class Inputs:
    """Targets, upstream gradient weights and the loss batch of one shape, plus a logits factory."""

    def __init__(self, shape: Shape, device: str, seed: int):
        self.shape, self.device, self.seed = shape, device, seed
        n, v = shape.n_tokens, shape.vocab
        gen = torch.Generator(device="cpu").manual_seed(seed + 1)
        self.targets = torch.randint(0, v, (n,), generator=gen).to(device)
        # Random upstream gradients of the op's two outputs, so both backward terms are exercised.
        self.grad_logp = torch.randn(n, generator=gen).to(device)
        self.grad_entropy = 0.1 * torch.randn(n, generator=gen).to(device)
        self._batch = None
        self._linear_batch = None
        self._weight = None

    def logits(self, requires_grad: bool = False, nonleaf: bool = False) -> torch.Tensor:
        """Fresh [N, V] logits from the seed. `nonleaf` gives a graph output (as an LM head's logits are),
        which an in-place backward may overwrite; its producer is a scalar add that keeps no [N, V] alive."""
        gen = torch.Generator(device=self.device).manual_seed(self.seed)
        shape = (self.shape.n_tokens, self.shape.vocab)
        logits = torch.randn(shape, generator=gen, device=self.device, dtype=self.shape.torch_dtype)
        logits.mul_(LOGIT_STD)
        if nonleaf:
            bias = torch.zeros((), dtype=logits.dtype, device=self.device, requires_grad=True)
            return logits + bias
        return logits.requires_grad_(requires_grad)

    def batch(self) -> dict:
        """The loss batch ([B, L] layout), built once; old/ref log-probs are the current policy's plus noise."""
        if self._batch is None:
            from erpo import logprobs_and_entropy

            b = self.shape.sequences
            seq_len = self.shape.n_tokens // b
            gen = torch.Generator(device="cpu").manual_seed(self.seed + 2)
            with torch.no_grad():
                logp, _ = logprobs_and_entropy(self.logits(), self.targets)
            logp = logp.view(b, seq_len).cpu()
            # Responses of different lengths: each keeps between 3/4 and all of its L positions (at least one).
            lengths = seq_len - torch.randint(0, max(1, seq_len // 4), (b,), generator=gen)
            mask = torch.arange(seq_len)[None, :] < lengths[:, None]
            batch = {
                "targets": self.targets.view(b, seq_len).cpu(),
                "mask": mask,
                "old_logp": (logp + LOGP_NOISE * torch.randn(b, seq_len, generator=gen)).clamp(max=0.0),
                "ref_logp": (logp + LOGP_NOISE * torch.randn(b, seq_len, generator=gen)).clamp(max=0.0),
                "advantages": torch.randn(b, generator=gen),
                "group_ids": torch.arange(b) // GROUP_SIZE,
            }
            self._batch = {k: t.to(self.device) for k, t in batch.items()}
        return self._batch

    def hidden(self) -> torch.Tensor:
        """Fresh [N, H] hidden states (a leaf that requires grad), from the seed."""
        gen = torch.Generator(device=self.device).manual_seed(self.seed + 3)
        shape = (self.shape.n_tokens, self.shape.hidden_size)
        hidden = torch.randn(shape, generator=gen, device=self.device, dtype=self.shape.torch_dtype)
        return hidden.requires_grad_()

    def weight(self) -> torch.Tensor:
        """The [V, H] LM head, built once (an input, like the model's own): logits h @ W.T of std LOGIT_STD."""
        if self._weight is None:
            gen = torch.Generator(device=self.device).manual_seed(self.seed + 4)
            shape = (self.shape.vocab, self.shape.hidden_size)
            weight = torch.randn(shape, generator=gen, device=self.device, dtype=self.shape.torch_dtype)
            self._weight = weight.mul_(LOGIT_STD / self.shape.hidden_size ** 0.5).requires_grad_()
        return self._weight

    def linear_batch(self) -> dict:
        """The loss batch of the linear kind: as batch(), with old/ref log-probs of the head's own logits."""
        if self._linear_batch is None:
            from erpo import linear_logprobs_and_entropy

            b = self.shape.sequences
            seq_len = self.shape.n_tokens // b
            with torch.no_grad():
                logp, _ = linear_logprobs_and_entropy(self.hidden(), self.weight(), self.targets)
            gen = torch.Generator(device="cpu").manual_seed(self.seed + 5)
            logp = logp.view(b, seq_len).cpu()
            lengths = seq_len - torch.randint(0, max(1, seq_len // 4), (b,), generator=gen)
            mask = torch.arange(seq_len)[None, :] < lengths[:, None]
            batch = {
                "targets": self.targets.view(b, seq_len).cpu(),
                "mask": mask,
                "old_logp": logp + LOGP_NOISE * torch.randn(b, seq_len, generator=gen),
                "ref_logp": logp + LOGP_NOISE * torch.randn(b, seq_len, generator=gen),
                "advantages": torch.randn(b, generator=gen),
                "group_ids": torch.arange(b) // GROUP_SIZE,
            }
            self._linear_batch = {k: t.to(self.device) for k, t in batch.items()}
        return self._linear_batch
