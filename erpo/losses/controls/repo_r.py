"""REPO-R (Petrenko et al. 2026): a (1 - zeta sg(logp)) clamped >= 0 for a > 0, a (1 + zeta sg(logp)) clamped
<= 0 for a < 0; its controller doubles / halves |zeta| toward a target entropy between optimizer steps."""
from erpo.losses.controllers import EntropyTargetController
from erpo.losses.controls import Control, lazy, numbers, on_advantage

torch, lib = lazy("torch"), lazy("erpo.losses.shaping")


def check(config) -> None:
    numbers(config, "zeta", "zeta_min", "zeta_max")
    if not 0.0 < config.zeta_min <= config.zeta_max:
        raise ValueError(f"LossConfig needs 0 < zeta_min <= zeta_max, got {config.zeta_min}, {config.zeta_max}")
    if not config.zeta_min <= abs(config.zeta) <= config.zeta_max:
        raise ValueError(f"LossConfig.|zeta| must be in [zeta_min, zeta_max], got {config.zeta}")


class RepoRZetaController(EntropyTargetController):
    """REPO-R: |zeta| doubled when entropy is below target, halved otherwise, clipped to [zeta_min, zeta_max]."""

    knob = "zeta"

    def __init__(self, config):
        super().__init__(config)
        self.bounds_ = (config.zeta_min, config.zeta_max)


def shaped(a, logp, zeta):
    """The REPO-R advantage of token advantages `a` (any shape)."""
    positive = (a * (1 - zeta * logp)).clamp_min(0)
    negative = (a * (1 + zeta * logp)).clamp_max(0)
    return torch.where(a > 0, positive, torch.where(a < 0, negative, torch.zeros_like(a)))


def repo_r(config, tokens, base):
    adv = shaped(base, tokens.logp, config.zeta)
    return lib.Shaping(adv=torch.where(tokens.valid, adv, torch.zeros_like(base)))


def naive(config, d) -> None:
    d.a = shaped(d.a, d.lp, config.zeta)


CONTROL = Control(
    name="repo_r", order=40, check=check, reads_entropy=True, controller=RepoRZetaController,
    knobs=dict(zeta=1e-3, zeta_min=1e-4, zeta_max=0.05, target_entropy=None), apply=on_advantage(repo_r),
    naive=naive,
)
