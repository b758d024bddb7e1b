"""Identical random inputs for erpo and a peer: padded [B, L] per-token tensors in float32 (odd sizes, ragged
masks, both advantage signs, ratios on both sides of every clip range)."""
from dataclasses import dataclass

import torch

RTOL = 1e-5  # relative tolerance of every parity check (fp32)


@dataclass
class TokenInputs:
    logp: torch.Tensor  # [B, L] leaf, requires grad
    entropy: torch.Tensor  # [B, L] leaf, requires grad
    old: torch.Tensor
    ref: torch.Tensor
    rollout: torch.Tensor
    mask: torch.Tensor  # [B, L] float 0/1, every row has >= 1 valid token
    advantages: torch.Tensor  # [B]

    def fresh(self):
        """Copies of logp and entropy as new leaves (one per side of a comparison)."""
        return (self.logp.detach().clone().requires_grad_(True), self.entropy.detach().clone().requires_grad_(True))


def near(logp: torch.Tensor, spread: float) -> torch.Tensor:
    """Log-probs near `logp` (a random log-ratio of scale `spread`), kept <= 0 as log-probs must be."""
    return -(logp + spread * torch.randn_like(logp)).abs() - 1e-4


def token_inputs(batch: int = 5, length: int = 7, spread: float = 0.3, dtype=torch.float32) -> TokenInputs:
    logp = torch.log(torch.rand(batch, length, dtype=dtype) * 0.9 + 0.05)
    old = near(logp, spread)
    ref = near(logp, spread)
    rollout = near(old, spread)
    lengths = torch.randint(1, length + 1, (batch,))
    lengths[0] = length  # one full row, so the padded length is the longest response
    mask = (torch.arange(length)[None, :] < lengths[:, None]).to(dtype)
    advantages = torch.randn(batch, dtype=dtype)
    # Every branch is hit: a large ratio (e^1.5 > dual_clip_c = 3) on a negative- and on a positive-advantage row
    old[0::2, 0] = logp[0::2, 0].detach() - 1.5
    advantages[0], advantages[2 % batch] = -advantages[0].abs() - 0.1, advantages[2 % batch].abs() + 0.1
    entropy = torch.rand(batch, length, dtype=dtype) * 3.0 + 0.1
    return TokenInputs(logp.requires_grad_(True), entropy.requires_grad_(True), old, ref, rollout, mask, advantages)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, rtol: float = RTOL, floor: float = 0.0) -> None:
    """Relative error of the whole tensor: norm of the difference over the norm of the peer's value, or over `floor`
    when that is larger. A loss is a weighted mean of per-token terms of size ~|advantage| whose signs differ, so it
    can be much smaller than its terms and carry their fp32 rounding: loss checks pass floor = mean |advantage|,
    the size of the terms (loss_floor)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} vs peer {tuple(expected.shape)}"
    assert torch.isfinite(actual).all() and torch.isfinite(expected).all(), f"{what}: non-finite values"
    scale = max(expected.norm().item(), float(floor), 1e-30)
    error = (actual - expected).norm().item() / scale
    assert error <= rtol, f"{what}: relative error {error:.3e} > {rtol:.0e} (erpo {actual.flatten()[:6].tolist()}, " \
                          f"peer {expected.flatten()[:6].tolist()})"


def loss_floor(advantages: torch.Tensor) -> float:
    """The size of a loss's per-token terms (see assert_close)."""
    return advantages.abs().mean().item()
