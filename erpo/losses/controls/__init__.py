"""The control registry: one file per control in this folder, each declaring a `CONTROL` (a `Control`).

A control reshapes the token advantage, drops tokens' terms, or selects tokens for a penalty or a per-token clip
range (the [N]-sized middle of every loss); any number compose on any objective. Every list of controls elsewhere
is derived from the declarations. They import no torch at import time (`lazy`): LossConfig validates against them
without loading torch.
"""
import importlib
import math
import pkgutil
from dataclasses import dataclass, field
from typing import Callable, Optional

from erpo.hints import did_you_mean


@dataclass(frozen=True)
class Control:
    name: str
    order: int  # its place in the order controls run in: advantage shapings (< 100), then selections
    knobs: dict = field(default_factory=dict)  # the LossConfig fields it reads -> their defaults
    check: Optional[Callable] = None  # check(config): validate the knobs (always), the combination (when enabled)
    reads_entropy: bool = False  # the per-token entropy (or, for a controller, the mean entropy)
    row_local: bool = False  # changes nothing per token: the one-pass fused-head schedule stays exact with it
    shapes_tokens: bool = True  # changes the token advantage or drops tokens' terms (needs a per-token advantage)
    excludes: tuple = ()  # controls it is an alternative form of (one of them per config)
    needs_groups: bool = False  # the batch must carry group_ids
    needs_ref: Optional[Callable] = None  # needs_ref(config): the batch must carry ref_logp
    controller: Optional[Callable] = None  # controller(config) -> a controller (erpo/losses/controllers.py) or None
    apply: Optional[Callable] = None  # apply(config, tokens, shaping, generator) -> Shaping of this step
    naive: Optional[Callable] = None  # naive(config, dense): the dense [B, L] form, changing the naive.Dense
    inert_on_policy: str = ""  # what it cannot do while every importance ratio is 1 (erpo/train/offpolicy.py)


class lazy:  # noqa: N801 (stands in for a module)
    """A module imported on first attribute access: `torch = lazy("torch")` keeps a declaration's import torch-free."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr):
        return getattr(importlib.import_module(self._name), attr)


def number(name, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"LossConfig.{name} must be a number, got {type(value).__name__} ({value!r})")
    if not math.isfinite(value):
        raise ValueError(f"LossConfig.{name} must be finite, got {value}")
    return float(value)


def numbers(config, *names) -> None:
    """Each named field of config as a finite float (in place)."""
    for name in names:
        setattr(config, name, number(name, getattr(config, name)))


def choice(name, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"LossConfig.{name} must be one of {allowed}, got {value!r}{did_you_mean(value, allowed)}")


def integer(name, value, minimum) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"LossConfig.{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"LossConfig.{name} must be >= {minimum}, got {value}")


REGISTRY: dict = {}


def register(control: Control) -> Control:
    """Add a control (this folder's files are added on import; a test may add its own)."""
    REGISTRY[control.name] = control
    return control


def ordered(names=None) -> list:
    """The controls of `names` (default: every registered one) in the order they run."""
    chosen = REGISTRY.values() if names is None else (REGISTRY[n] for n in names)
    return sorted(chosen, key=lambda c: (c.order, c.name))


def names() -> tuple:
    return tuple(c.name for c in ordered())


def on_advantage(function):
    """An `apply` from a function of (config, tokens, the token advantage so far) -> Shaping."""
    return lambda config, tokens, shaping, generator: function(config, tokens, shaping.adv)


for _module in pkgutil.iter_modules(__path__):
    register(importlib.import_module(f"{__name__}.{_module.name}").CONTROL)

