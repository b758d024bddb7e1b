"""Peers for the parity tests: TRL 1.16.0, Liger-Kernel 0.8.5 and verl 0.9.1, pinned (`.ci/run` installs them).

A test asks for a peer through a fixture. When the peer is not installed the test is skipped with the reason,
unless ERPO_REQUIRE_PEERS=1 (set by .ci/run), where a missing peer fails the test: CI can never pass by
skipping every comparison. verl's `core_algos` imports Ray only for type annotations and `isinstance`
checks; where Ray is absent the `verl_core` fixture puts a stub module named `ray` into sys.modules for the
session (never when the real Ray is installed) and removes it afterwards.
"""
import importlib
import importlib.util
import os
import sys
import types

import pytest

PINNED = {"trl": "1.16.0", "liger_kernel": "0.8.5", "verl": "0.9.1"}


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist.replace("_", "-"))


def require_peer(module: str):
    """Import `module` (one of PINNED) or skip / fail with the reason; a version other than the pin fails."""
    try:
        imported = importlib.import_module(module)
    except ImportError as err:
        reason = f"{module} is not installed ({err}); install the pinned peers as .ci/run does"
        if os.environ.get("ERPO_REQUIRE_PEERS") == "1":
            pytest.fail(f"ERPO_REQUIRE_PEERS=1 but {reason}")
        pytest.skip(reason)
    found = _version(module)
    if found != PINNED[module]:
        pytest.fail(f"{module} {found} is installed but the parity tests are written against {PINNED[module]}")
    return imported


class _RayStubError(AttributeError):
    pass


def _ray_stub() -> types.ModuleType:
    stub = types.ModuleType("ray")
    stub.__erpo_stub__ = True

    class ObjectRef:  # only ever used by verl in annotations and isinstance checks
        pass

    stub.ObjectRef = ObjectRef

    def __getattr__(name):
        raise _RayStubError(f"ray is stubbed in erpo's tests (Ray is not installed): ray.{name} is unavailable")

    stub.__getattr__ = __getattr__
    return stub


@pytest.fixture(scope="session")
def ray_stub():
    """A stub `ray` in sys.modules while verl is imported, only where the real Ray is not installed."""
    inserted = False
    if "ray" not in sys.modules and importlib.util.find_spec("ray") is None:
        sys.modules["ray"] = _ray_stub()
        inserted = True
    yield
    if inserted and getattr(sys.modules.get("ray"), "__erpo_stub__", False):
        del sys.modules["ray"]


@pytest.fixture(scope="session")
def verl_core(ray_stub):
    """verl.trainer.ppo.core_algos (with Ray stubbed where absent)."""
    require_peer("verl")
    return importlib.import_module("verl.trainer.ppo.core_algos")


@pytest.fixture(scope="session")
def trl_grpo():
    """trl.trainer.grpo_trainer (the module: GRPOTrainer and its helpers)."""
    require_peer("trl")
    return importlib.import_module("trl.trainer.grpo_trainer")


@pytest.fixture(scope="session")
def liger_grpo():
    """liger_kernel.chunked_loss.grpo_loss (LigerFusedLinearGRPOLoss, plain torch)."""
    require_peer("liger_kernel")
    return importlib.import_module("liger_kernel.chunked_loss.grpo_loss")
