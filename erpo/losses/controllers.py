"""Stateful knobs stepped once per batch by the trainer (the loss stays a pure function of the config).

    controller = make_controller(config)        # None for stateless methods
    result = policy_loss(logits, batch, controller.apply(config) if controller else config)
    controller.step(result.metrics)              # reads metrics["entropy"] (one host sync, outside the loss)

REPO-R (zeta) and ADAPO (eps_high): double/halve toward a target entropy (spec section 4): mean entropy
below target -> double, else halve, then clip. The target is config.target_entropy, or the entropy seen at
the first step (that step sets the target and changes nothing). KL-Cov: beta annealed toward 0.
Adaptive entropy coefficient (`entropy_target`, TRL's Skywork-OR1 rule): the coefficient steps up by
entropy_coef_step while the mean entropy is <= the target and down otherwise, within [min, max], and the
bonus applies only while the last measured entropy is <= the target.
A config with several stateful controls gets one controller per control (`Controllers`); each control declares
its own (erpo/losses/controls/<name>.py, `controller`).
A step whose metrics report no valid token (n_valid_tokens == 0: every micro-batch empty) leaves the
entropy-driven controllers as they were; KL-Cov's annealing counts optimizer steps and steps anyway.
"""
import importlib
import math
from typing import Optional


def _mean_entropy(metrics_or_entropy) -> Optional[float]:
    """The step's mean entropy, or None when a metrics dict reports no valid token (an empty batch measures
    nothing: the entropy controllers keep their state, never step on a made-up 0 or NaN)."""
    if isinstance(metrics_or_entropy, dict):
        n_valid = metrics_or_entropy.get("n_valid_tokens")
        if n_valid is not None and float(n_valid) == 0:
            return None
        value = metrics_or_entropy["entropy"]
    else:
        value = metrics_or_entropy
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"controller.step got a non-finite mean entropy ({value}); the step's loss is broken")
    return value


class EntropyTargetController:
    """Double/halve one knob toward a target entropy; subclasses name the knob and its bounds."""

    knob = ""
    bounds_: tuple = (0.0, math.inf)

    def __init__(self, config):
        self.value = float(getattr(config, self.knob))
        self.target: Optional[float] = config.target_entropy
        self.steps = 0

    def step(self, metrics_or_entropy) -> None:
        entropy = _mean_entropy(metrics_or_entropy)
        if entropy is None:
            return
        self.steps += 1
        if self.target is None:
            self.target = entropy
            return
        magnitude = abs(self.value) * (2.0 if entropy < self.target else 0.5)
        low, high = self.bounds_
        self.value = math.copysign(min(max(magnitude, low), high), self.value)

    def apply(self, config):
        return config.replace(**{self.knob: self.value})

    def state_dict(self) -> dict:
        return {"knob": self.knob, "value": self.value, "target": self.target, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        if state.get("knob") != self.knob:
            raise ValueError(f"controller state is for {state.get('knob')!r}, this controller drives {self.knob!r}")
        self.value, self.target, self.steps = float(state["value"]), state["target"], int(state["steps"])


class AdaptiveEntropyCoef:
    """TRL's adaptive entropy coefficient: coef += step if entropy <= target else coef -= step (clipped to
    [entropy_coef_min, entropy_coef_max]); the applied coefficient is coef while the last entropy <= target, else 0."""

    knob = "entropy_coef"

    def __init__(self, config):
        self.coef = config.entropy_coef
        self.target = config.entropy_target
        self.low, self.high, self.delta = config.entropy_coef_min, config.entropy_coef_max, config.entropy_coef_step
        self.last_entropy: Optional[float] = None  # None: no entropy measured yet, no bonus (TRL starts at +inf)
        self.steps = 0

    @property
    def value(self) -> float:
        active = self.last_entropy is not None and self.last_entropy <= self.target
        return self.coef if active else 0.0

    def step(self, metrics_or_entropy) -> None:
        entropy = _mean_entropy(metrics_or_entropy)
        if entropy is None:
            return
        self.steps += 1
        if entropy <= self.target:
            self.coef = min(self.coef + self.delta, self.high)
        else:
            self.coef = max(self.coef - self.delta, self.low)
        self.last_entropy = entropy

    def apply(self, config):
        return config.replace(entropy_coef=self.value)

    def state_dict(self) -> dict:
        return {"knob": self.knob, "coef": self.coef, "last_entropy": self.last_entropy, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        if state.get("knob") != self.knob:
            raise ValueError(f"controller state is for {state.get('knob')!r}, this controller drives {self.knob!r}")
        self.coef, self.last_entropy, self.steps = float(state["coef"]), state["last_entropy"], int(state["steps"])


class Controllers:
    """Several controllers of one config, stepped and applied in turn (each drives its own knob)."""

    def __init__(self, controllers: list):
        self.controllers = controllers

    def step(self, metrics_or_entropy) -> None:
        for controller in self.controllers:
            controller.step(metrics_or_entropy)

    def apply(self, config):
        return config.replace(**{c.knob: c.value for c in self.controllers})

    def state_dict(self) -> dict:
        return {"controllers": [c.state_dict() for c in self.controllers]}

    def load_state_dict(self, state: dict) -> None:
        states = state.get("controllers")
        if states is None or len(states) != len(self.controllers):
            raise ValueError(f"controller state holds {0 if states is None else len(states)} controllers, this config "
                             f"has {len(self.controllers)}")
        for controller, sub in zip(self.controllers, states):
            controller.load_state_dict(sub)


def make_controller(config):
    """The controller of a config's stateful controls, or None (one controller, or `Controllers` for several)."""
    controls = importlib.import_module("erpo.losses.controls")  # its files import this module's base classes
    made = [c.controller(config) for c in controls.ordered(config.controls) if c.controller is not None]
    if config.entropy_target is not None:
        made.append(AdaptiveEntropyCoef(config))
    controllers = [c for c in made if c is not None]
    if not controllers:
        return None
    return controllers[0] if len(controllers) == 1 else Controllers(controllers)

