"""Small random batches for the policy-loss tests (fresh per test: tests/conftest.py seeds torch)."""
import pytest
import torch


def random_batch(B=6, L=7, V=19, group_size=3, dtype=torch.float32, with_ref=True, rewards=True, empty_rows=(),
                 adv_scale=1.0, logit_scale=2.0, device="cpu"):
    """logits [B, L, V] and a batch dict; old/ref log-probs near the policy's so ratios straddle the clip."""
    logits = torch.randn(B, L, V, dtype=torch.float64) * logit_scale
    targets = torch.randint(0, V, (B, L))
    mask = torch.rand(B, L) > 0.25
    mask[:, 0] = True
    for row in empty_rows:
        mask[row] = False
    logp = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
    batch = {
        "targets": targets,
        "mask": mask,
        "old_logp": (logp + 0.3 * torch.randn(B, L)).clamp(max=0.0).float(),  # log-probs: <= 0
    }
    if with_ref:
        batch["ref_logp"] = (logp + 0.5 * torch.randn(B, L)).clamp(max=0.0).float()
    group_ids = torch.arange(B) // group_size * 7 + 3  # arbitrary (not dense) ids
    if rewards:
        batch["rewards"] = torch.randint(0, 3, (B,)).float()
        batch["group_ids"] = group_ids
    else:
        batch["advantages"] = torch.randn(B) * adv_scale
        batch["group_ids"] = group_ids
    return logits.to(device, dtype), {name: value.to(device) for name, value in batch.items()}


@pytest.fixture
def make_batch():
    return random_batch
