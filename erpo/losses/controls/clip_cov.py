"""Clip-Cov (Cui et al. 2025): zero the whole loss term of min(#candidates, max(1, floor(r N_valid))) tokens
picked at random among the unclipped valid tokens whose covariance (a - mean a)(logp - mean logp) lies in
(clip_cov_lb, clip_cov_ub)."""
import math

from erpo.losses.controls import Control, integer, lazy, numbers

torch, lib = lazy("torch"), lazy("erpo.losses.shaping")


def check(config) -> None:
    numbers(config, "clip_cov_ratio", "clip_cov_lb", "clip_cov_ub")
    if not 0.0 < config.clip_cov_ratio <= 1.0:
        raise ValueError(f"LossConfig.clip_cov_ratio must be in (0, 1], got {config.clip_cov_ratio}")
    if not config.clip_cov_lb < config.clip_cov_ub:
        raise ValueError(f"LossConfig.clip_cov_lb ({config.clip_cov_lb}) must be < clip_cov_ub ({config.clip_cov_ub})")
    integer("seed", config.seed, 0)


def clip_cov(config, tokens, base, generator, eps_low=None, eps_high=None):
    """`eps_low`/`eps_high`: per-token clip ranges when another control set them (Archer)."""
    cov = lib.covariance(tokens, base)
    ratio = torch.exp(tokens.logp - tokens.old)
    low = 1 - (config.eps_low if eps_low is None else eps_low)
    high = 1 + (config.eps_high if eps_high is None else eps_high)
    clip_active = -base * torch.minimum(torch.maximum(ratio, torch.as_tensor(low, dtype=ratio.dtype)),
                                        torch.as_tensor(high, dtype=ratio.dtype)) > -base * ratio
    candidate = tokens.valid & (cov > config.clip_cov_lb) & (cov < config.clip_cov_ub) & ~clip_active
    budget = torch.minimum(candidate.sum(), lib.budget(config.clip_cov_ratio, tokens.n_valid))
    keys = torch.rand(base.numel(), generator=generator, device=base.device, dtype=torch.float32)
    keys = torch.where(candidate, keys, torch.full_like(keys, float("inf")))
    picked = candidate & (lib.rank(keys, descending=False) < budget)
    return lib.Shaping(
        adv=base,
        keep=(~picked).to(base.dtype),
        masked=picked,
        metrics={"cov_candidates": candidate.sum(), "clip_cov_frac": picked.sum() / tokens.n_valid},
    )


def naive_covariance(d):
    valid_a, valid_lp = d.a[d.mask], d.lp[d.mask]
    return (d.a - valid_a.mean()) * (d.lp - valid_lp.mean())


def naive(config, d) -> None:
    n_cells, n_valid = d.mask.numel(), int(d.mask.sum())
    ratio = torch.exp(d.lp - d.old)
    clipped = -d.a * torch.clamp(ratio, 1 - d.eps_low, 1 + d.eps_high) > -d.a * ratio
    cov, mask, clipped = naive_covariance(d).view(-1).tolist(), d.mask.view(-1).tolist(), clipped.view(-1).tolist()
    candidates = [j for j in range(n_cells) if mask[j] and config.clip_cov_lb < cov[j] < config.clip_cov_ub
                  and not clipped[j]]
    k = min(len(candidates), max(1, math.floor(config.clip_cov_ratio * n_valid)))
    generator = d.generator
    if generator is None:
        generator = torch.Generator(device=d.a.device).manual_seed(config.seed)
    keys = torch.rand(n_cells, generator=generator, device=d.a.device, dtype=torch.float32)
    for j in sorted(candidates, key=lambda j: (float(keys[j]), j))[:k]:
        d.keep.view(-1)[j] = 0
        d.masked.view(-1)[j] = True


CONTROL = Control(
    name="clip_cov", order=70, check=check, excludes=("kl_cov",),
    knobs=dict(clip_cov_ratio=2e-4, clip_cov_lb=1.0, clip_cov_ub=5.0, seed=0),
    apply=lambda config, tokens, shaping, generator: clip_cov(config, tokens, shaping.adv, generator, shaping.eps_low,
                                                              shaping.eps_high),
    naive=naive,
)
