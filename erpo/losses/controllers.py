"""Stateful knobs stepped once per batch by the trainer (the loss stays a pure function of the config).

    controller = make_controller(config)        # None for stateless methods
    result = policy_loss(logits, batch, controller.apply(config) if controller else config)
    controller.step(result.metrics)              # reads metrics["entropy"] (one host sync, outside the loss)

REPO-R (zeta) and ADAPO (eps_high): double/halve toward a target entropy (spec section 4): mean entropy
below target -> double, else halve, then clip. The target is config.target_entropy, or the entropy seen at
the first step (that step sets the target and changes nothing). KL-Cov: beta annealed toward 0.
"""
import math
from typing import Optional, Union

from torch import Tensor

from erpo.losses.config import LossConfig


def _mean_entropy(metrics_or_entropy: Union[dict, float, Tensor]) -> float:
    value = metrics_or_entropy["entropy"] if isinstance(metrics_or_entropy, dict) else metrics_or_entropy
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"controller.step got a non-finite mean entropy ({value}); the step's loss is broken")
    return value


class EntropyTargetController:
    """Double/halve one knob toward a target entropy; subclasses name the knob and its bounds."""

    knob = ""
    bounds_: tuple = (0.0, math.inf)

    def __init__(self, config: LossConfig):
        self.value = float(getattr(config, self.knob))
        self.target: Optional[float] = config.target_entropy
        self.steps = 0

    def step(self, metrics_or_entropy) -> None:
        entropy = _mean_entropy(metrics_or_entropy)
        self.steps += 1
        if self.target is None:
            self.target = entropy
            return
        magnitude = abs(self.value) * (2.0 if entropy < self.target else 0.5)
        low, high = self.bounds_
        self.value = math.copysign(min(max(magnitude, low), high), self.value)

    def apply(self, config: LossConfig) -> LossConfig:
        return config.replace(**{self.knob: self.value})

    def state_dict(self) -> dict:
        return {"knob": self.knob, "value": self.value, "target": self.target, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        if state.get("knob") != self.knob:
            raise ValueError(f"controller state is for {state.get('knob')!r}, this controller drives {self.knob!r}")
        self.value, self.target, self.steps = float(state["value"]), state["target"], int(state["steps"])


class RepoRZetaController(EntropyTargetController):
    """REPO-R: |zeta| doubled when entropy is below target, halved otherwise, clipped to [zeta_min, zeta_max]."""

    knob = "zeta"

    def __init__(self, config: LossConfig):
        super().__init__(config)
        self.bounds_ = (config.zeta_min, config.zeta_max)


class AdapoEpsHighController(EntropyTargetController):
    """ADAPO: eps_high doubled when entropy is below target, halved otherwise, clipped to [eps_low, eps_high_max]."""

    knob = "eps_high"

    def __init__(self, config: LossConfig):
        super().__init__(config)
        self.bounds_ = (config.eps_low, config.eps_high_max)


class KLCovBetaAnneal:
    """KL-Cov: beta_t = beta_0 * s(t / T), s linear (1 - x) or cosine ((1 + cos(pi x)) / 2), 0 after T steps."""

    def __init__(self, config: LossConfig):
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

    def apply(self, config: LossConfig) -> LossConfig:
        return config.replace(kl_cov_beta=self.value)

    def state_dict(self) -> dict:
        return {"knob": "kl_cov_beta", "beta0": self.beta0, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        if state.get("knob") != "kl_cov_beta":
            raise ValueError(f"controller state is for {state.get('knob')!r}, this controller drives 'kl_cov_beta'")
        self.beta0, self.steps = float(state["beta0"]), int(state["steps"])


def make_controller(config: LossConfig):
    """The controller of a stateful method, or None."""
    if config.method == "repo_r":
        return RepoRZetaController(config)
    if config.method == "adapo":
        return AdapoEpsHighController(config)
    if config.method == "kl_cov" and config.kl_cov_anneal != "none":
        return KLCovBetaAnneal(config)
    return None
