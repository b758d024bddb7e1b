"""Entropy advantage (Cheng et al. 2025, "Reasoning with Exploration: An Entropy Perspective"):
a' = a + min(alpha sg(H), |a| / kappa); the bonus never flips the sign of a (kappa > 1) and is 0 where a = 0."""
from erpo.losses.controls import Control, lazy, numbers, on_advantage

torch, lib = lazy("torch"), lazy("erpo.losses.shaping")


def check(config) -> None:
    numbers(config, "entropy_adv_alpha", "entropy_adv_kappa")
    if config.entropy_adv_kappa <= 0:
        raise ValueError(f"LossConfig.entropy_adv_kappa must be > 0, got {config.entropy_adv_kappa}")
    if config.entropy_adv_alpha < 0:
        raise ValueError(f"LossConfig.entropy_adv_alpha must be >= 0, got {config.entropy_adv_alpha}")


def entropy_advantage(config, tokens, base):
    bonus = torch.minimum(config.entropy_adv_alpha * tokens.entropy, base.abs() / config.entropy_adv_kappa)
    bonus = torch.where(tokens.valid, bonus, torch.zeros_like(base))
    return lib.Shaping(adv=base + bonus, metrics={"entropy_adv_bonus": lib.valid_mean(bonus, tokens)})


def naive(config, d) -> None:
    bonus = torch.minimum(config.entropy_adv_alpha * d.H, d.a.abs() / config.entropy_adv_kappa)
    d.a = torch.where(d.mask, d.a + bonus, torch.zeros_like(d.a))


CONTROL = Control(
    name="entropy_advantage", order=20, check=check, reads_entropy=True,
    knobs=dict(entropy_adv_alpha=0.4, entropy_adv_kappa=2.0), apply=on_advantage(entropy_advantage), naive=naive,
)
