"""The 80/20 high-entropy mask (Wang et al. 2025): keep the policy-gradient term only where
H >= quantile_{1 - rho}(H over the valid tokens)."""
from erpo.losses.controls import Control, lazy, numbers, on_advantage

torch, lib = lazy("torch"), lazy("erpo.losses.shaping")


def check(config) -> None:
    numbers(config, "rho")
    if not 0.0 <= config.rho <= 1.0:
        # rho = 0 keeps only the highest-entropy token(s) (the 1.0 quantile), as TRL's top_entropy_quantile=0.0
        raise ValueError(f"LossConfig.rho (kept entropy quantile) must be in [0, 1], got {config.rho}")


def entropy_quantile(entropy, valid, q: float):
    """Linear-interpolation quantile q of entropy over the valid tokens (torch.quantile's rule), 0-d, no sync."""
    keys = torch.where(valid, entropy, torch.full_like(entropy, float("inf")))
    ordered = torch.sort(keys).values
    position = q * (valid.sum().to(entropy.dtype) - 1)
    low = position.floor().long().clamp(0, entropy.numel() - 1)
    high = position.ceil().long().clamp(0, entropy.numel() - 1)
    frac = position - low.to(entropy.dtype)
    # gather with a [1] index, not ordered[low]: indexing with a 0-d tensor reads it back to the host (a sync)
    at_low, at_high = ordered.gather(0, low.view(1)), ordered.gather(0, high.view(1))
    return (at_low + frac * (at_high - at_low)).reshape(())


def high_entropy_mask(config, tokens, base):
    threshold = entropy_quantile(tokens.entropy, tokens.valid, 1.0 - config.rho)
    kept = tokens.valid & (tokens.entropy >= threshold)
    dropped = tokens.valid & ~kept
    return lib.Shaping(
        adv=torch.where(kept, base, torch.zeros_like(base)),
        masked=dropped,
        metrics={"entropy_threshold": torch.where(tokens.valid.any(), threshold, torch.zeros_like(threshold)),
                 "entropy_mask_frac": dropped.sum() / tokens.n_valid},
    )


def naive(config, d) -> None:
    kept = d.mask & (d.H >= torch.quantile(d.H[d.mask], 1 - config.rho))
    d.a = torch.where(kept, d.a, torch.zeros_like(d.a))
    d.masked = d.masked | (d.mask & ~kept)


CONTROL = Control(
    name="high_entropy_mask", order=50, check=check, reads_entropy=True, knobs=dict(rho=0.2),
    apply=on_advantage(high_entropy_mask), naive=naive,
)
