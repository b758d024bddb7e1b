"""Policy losses of erpo (GRPO family, ERPO, entropy-control methods) on top of the fused logp/entropy op.

The names load on first use (PEP 562), so the command line's help can read `erpo.losses.config` (the preset
table) without importing torch. Two public functions share their module's name (`policy_loss`,
`linear_policy_loss`); importing that submodule must not rebind the package attribute to the module, or
`from erpo.losses import policy_loss` would hand back a module depending on import order.
"""
import importlib
import sys
import types

_HOMES = {
    "advantages": "erpo.losses.advantages",
    "LossConfig": "erpo.losses.config",
    "make_controller": "erpo.losses.controllers",
    "linear_policy_loss": "erpo.losses.linear_policy_loss",
    "linear_token_loss": "erpo.losses.linear_token_loss",
    "PolicyLoss": "erpo.losses.module",
    "LossResult": "erpo.losses.policy_loss",
    "policy_loss": "erpo.losses.policy_loss",
    "token_policy_loss": "erpo.losses.policy_loss",
}
_SUBMODULES = {"advantages"}  # public names that are modules themselves
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'erpo.losses' has no attribute {name!r}")
    module = importlib.import_module(_HOMES[name])
    value = module if name in _SUBMODULES else getattr(module, name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    def __setattr__(self, name, value):
        if isinstance(value, types.ModuleType) and name in _HOMES and name not in _SUBMODULES:
            return  # the import system binding submodule `policy_loss`; the public name is the function
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
