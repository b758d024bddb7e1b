"""Archer (Wang et al. 2025, dual-token constraints): in each response the tokens with H >= its (1 - archer_rho)
entropy quantile get the wider clip archer_eps on both sides and no KL; the others keep [eps_low, eps_high] and
the KL term."""
from erpo.losses.controls import Control, lazy, numbers, on_advantage

torch, lib, segments = lazy("torch"), lazy("erpo.losses.shaping"), lazy("erpo.losses.segments")


def check(config) -> None:
    numbers(config, "archer_rho", "archer_eps")
    if config.archer_eps <= 0:
        raise ValueError(f"LossConfig.archer_eps must be > 0, got {config.archer_eps}")
    if not 0.0 < config.archer_rho < 1.0:
        raise ValueError(f"LossConfig.archer_rho (high-entropy fraction) must be in (0, 1), got {config.archer_rho}")
    if "archer" in config.controls and config.objective != "clip":
        raise ValueError(f"LossConfig.controls 'archer' sets per-token clip ranges: objective must be 'clip', got "
                         f"{config.objective!r}")


def segment_quantile(values, segment, valid, n_segments: int, q: float):
    """[n_segments] linear-interpolation quantile q of `values` over each segment's valid entries (torch.quantile's
    rule per segment; an empty segment gives +inf), sorted on the device, no sync."""
    keys = torch.where(valid, values, torch.full_like(values, float("inf")))
    by_value = torch.sort(keys, stable=True).indices
    order = by_value[torch.sort(segment[by_value], stable=True).indices]  # by segment, then by value
    ordered = keys[order]
    sizes = segments.segment_sum(torch.ones_like(values), segment, n_segments).long()
    start = torch.cumsum(sizes, 0) - sizes
    counts = segments.segment_sum(valid.to(values.dtype), segment, n_segments)
    position = q * (counts - 1).clamp_min(0)
    low, high = position.floor().long(), position.ceil().long()
    last = values.numel() - 1
    at_low = ordered[(start + low).clamp(0, max(last, 0))]
    at_high = ordered[(start + high).clamp(0, max(last, 0))]
    quantile = at_low + (position - low.to(values.dtype)) * (at_high - at_low)
    return torch.where(counts > 0, quantile, torch.full_like(quantile, float("inf")))


def archer(config, tokens, base):
    threshold = segment_quantile(tokens.entropy, tokens.seq, tokens.valid, tokens.n_seqs, 1.0 - config.archer_rho)
    high = tokens.valid & (tokens.entropy >= threshold[tokens.seq])
    ones = torch.ones_like(base)
    return lib.Shaping(
        adv=base,
        eps_low=torch.where(high, config.archer_eps * ones, config.eps_low * ones),
        eps_high=torch.where(high, config.archer_eps * ones, config.eps_high * ones),
        kl_weight=(~high).to(base.dtype),
        metrics={"archer_high_frac": high.sum() / tokens.n_valid},
    )


def naive(config, d) -> None:
    """Per response: tokens with H >= the response's (1 - rho) entropy quantile."""
    high = torch.zeros_like(d.mask)
    for i in range(d.mask.shape[0]):
        if d.mask[i].any():
            high[i] = d.mask[i] & (d.H[i] >= torch.quantile(d.H[i][d.mask[i]], 1 - config.archer_rho))
    d.eps_low = torch.where(high, config.archer_eps, d.eps_low)
    d.eps_high = torch.where(high, config.archer_eps, d.eps_high)
    d.kl_weight = (~high).to(d.a.dtype)


CONTROL = Control(
    name="archer", order=60, check=check, reads_entropy=True, knobs=dict(archer_rho=0.2, archer_eps=0.5),
    apply=on_advantage(archer), naive=naive,
)
