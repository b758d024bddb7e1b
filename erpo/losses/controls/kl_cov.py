"""KL-Cov (Cui et al. 2025): + beta |logp - old| on the top max(1, floor(k N_valid)) valid tokens by covariance
(a - mean a)(logp - mean logp); its controller anneals beta toward 0 when kl_cov_anneal is set."""
import math

from erpo.losses.controls import Control, choice, integer, lazy, numbers, on_advantage
from erpo.losses.controls.clip_cov import naive_covariance

torch, lib = lazy("torch"), lazy("erpo.losses.shaping")
ANNEAL_SCHEDULES = ("none", "linear", "cosine")


def check(config) -> None:
    numbers(config, "kl_cov_ratio", "kl_cov_beta")
    choice("kl_cov_anneal", config.kl_cov_anneal, ANNEAL_SCHEDULES)
    if not 0.0 < config.kl_cov_ratio <= 1.0:
        raise ValueError(f"LossConfig.kl_cov_ratio must be in (0, 1], got {config.kl_cov_ratio}")
    if config.kl_cov_beta < 0:
        raise ValueError(f"LossConfig.kl_cov_beta must be >= 0, got {config.kl_cov_beta}")
    integer("kl_cov_anneal_steps", config.kl_cov_anneal_steps, 1)


class KLCovBetaAnneal:
    """KL-Cov: beta_t = beta_0 * s(t / T), s linear (1 - x) or cosine ((1 + cos(pi x)) / 2), 0 after T steps."""

    knob = "kl_cov_beta"

    def __init__(self, config):
        self.beta0 = config.kl_cov_beta
        self.schedule = config.kl_cov_anneal
        self.total = config.kl_cov_anneal_steps
        self.steps = 0

    @property
    def value(self) -> float:
        x = min(self.steps, self.total) / self.total
        scale = 1.0 - x if self.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * x))
        return self.beta0 * scale

    def step(self, metrics_or_entropy=None) -> None:
        self.steps += 1

    def apply(self, config):
        return config.replace(kl_cov_beta=self.value)

    def state_dict(self) -> dict:
        return {"knob": "kl_cov_beta", "beta0": self.beta0, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        if state.get("knob") != "kl_cov_beta":
            raise ValueError(f"controller state is for {state.get('knob')!r}, this controller drives 'kl_cov_beta'")
        self.beta0, self.steps = float(state["beta0"]), int(state["steps"])


def kl_cov(config, tokens, base):
    cov = lib.covariance(tokens, base)
    keys = torch.where(tokens.valid, cov, torch.full_like(cov, -float("inf")))
    picked = tokens.valid & (lib.rank(keys, descending=True) < lib.budget(config.kl_cov_ratio, tokens.n_valid))
    return lib.Shaping(adv=base, klcov_w=picked.to(base.dtype) * config.kl_cov_beta, masked=picked,
                       metrics={"kl_cov_frac": picked.sum() / tokens.n_valid})


def naive(config, d) -> None:
    cov = naive_covariance(d).view(-1)
    valid = [j for j in range(d.mask.numel()) if d.mask.view(-1)[j]]
    for j in sorted(valid, key=lambda j: (-float(cov[j]), j))[:max(1, math.floor(config.kl_cov_ratio * len(valid)))]:
        d.klcov.view(-1)[j] = config.kl_cov_beta
        d.masked.view(-1)[j] = True


CONTROL = Control(
    name="kl_cov", order=80, check=check, shapes_tokens=False, inert_on_policy="KL-Cov (its |logp - old| penalty)",
    controller=lambda config: KLCovBetaAnneal(config) if config.kl_cov_anneal != "none" else None,
    knobs=dict(kl_cov_ratio=2e-3, kl_cov_beta=1.0, kl_cov_anneal="none", kl_cov_anneal_steps=1000),
    apply=on_advantage(kl_cov), naive=naive,
)
