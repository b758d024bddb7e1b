"""The table of what is compared: each case is a name, the kinds it runs ("op": the bare logprobs+entropy,
"loss": a full policy loss), where it can run, and a builder of the function under test.

Baselines are imported, never re-implemented here: the naive reference comes from `erpo.losses.naive` (the
same code the tests check erpo against), and the third-party cases call each project's own function.
A case whose dependency is missing is skipped with the reason; an `optional` case that fails at run time
(e.g. torch.compile without a working compiler) is reported as skipped with the error, not as a failure.
"""
import importlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch

NAIVE_MODULE = "erpo.losses.naive"
LOSS_METHODS = ("grpo", "erpo")
MODES = {"op": ("fwd", "fwdbwd"), "loss": ("fwdbwd",)}  # a loss is only ever used for training


@dataclass(frozen=True)
class Case:
    name: str
    kinds: tuple
    needs_cuda: bool = False
    inplace: bool = False  # the backward overwrites the logits: needs graph-output logits, fwd+bwd only
    optional: bool = False  # a run-time failure means "not available here", not "broken"
    methods: tuple = LOSS_METHODS
    # Returns the reason this case cannot run here, or None.
    unavailable: Callable[[], Optional[str]] = lambda: None

    def runs(self, kind: str, mode: str) -> bool:
        return kind in self.kinds and not (self.inplace and mode == "fwd")


def _import_reason(module: str, what: str) -> Callable[[], Optional[str]]:
    def reason():
        try:
            importlib.import_module(module)
        except Exception as err:  # an installed-but-broken package is as unavailable as a missing one
            return f"{what} not importable ({type(err).__name__}: {err})"
        return None

    return reason


def _cuda_extension_reason() -> Optional[str]:
    try:
        importlib.import_module("erpo._C")
    except ImportError as err:
        return f"erpo._C (the CUDA extension) is not built ({err})"
    return None


CASES = (
    Case("naive", ("op", "loss"), unavailable=_import_reason(NAIVE_MODULE, "the naive reference")),
    Case("naive-compiled", ("op", "loss"), optional=True, unavailable=_import_reason(NAIVE_MODULE, "the naive reference")),
    Case("erpo-torch", ("op",)),
    Case("erpo-torch-inplace", ("op",), inplace=True),
    Case("erpo-triton", ("op",), needs_cuda=True),
    Case("erpo-triton-inplace", ("op",), needs_cuda=True, inplace=True),
    Case("erpo-cuda", ("op",), needs_cuda=True, unavailable=_cuda_extension_reason),
    Case("erpo-cuda-inplace", ("op",), needs_cuda=True, inplace=True, unavailable=_cuda_extension_reason),
    Case("erpo", ("loss",), unavailable=_import_reason("erpo.losses", "erpo.losses")),
    Case("trl", ("op",), optional=True, unavailable=_import_reason("trl.trainer.utils", "trl")),
    Case("verl", ("op",), optional=True, unavailable=_import_reason("verl.utils.torch_functional", "verl")),
    Case("liger", ("loss",), needs_cuda=True, optional=True, methods=("grpo",),
         unavailable=_import_reason("liger_kernel.transformers.grpo_loss", "liger_kernel")),
)
BY_NAME = {case.name: case for case in CASES}


def skip_reason(case: Case, device: str) -> Optional[str]:
    if case.needs_cuda and device != "cuda":
        return "needs a CUDA GPU"
    return case.unavailable()


# ---- builders: (case name, kind, method, inputs) -> function of the logits -------------------------------

def _naive_op():
    naive = importlib.import_module(NAIVE_MODULE)
    return lambda logits, targets: naive.naive_logprobs_and_entropy(logits, targets, temperature=1.0)


def _erpo_op(backend: str, inplace: bool):
    from erpo import logprobs_and_entropy

    return lambda logits, targets: logprobs_and_entropy(logits, targets, inplace_grad=inplace, backend=backend)


def _trl_op():
    utils = importlib.import_module("trl.trainer.utils")
    return lambda logits, targets: (utils.selective_log_softmax(logits, targets), utils.entropy_from_logits(logits))


def _verl_op():
    functional = importlib.import_module("verl.utils.torch_functional")
    return lambda logits, targets: (
        functional.logprobs_from_logits(logits, targets), functional.entropy_from_logits(logits)
    )


def build_op(name: str) -> Callable:
    """A function (logits [N, V], targets [N]) -> (logp [N], entropy [N])."""
    if name == "naive":
        return _naive_op()
    if name == "naive-compiled":
        return torch.compile(_naive_op())
    if name.startswith("erpo-"):
        backend = name.split("-")[1]
        return _erpo_op(backend, inplace=name.endswith("-inplace"))
    if name == "trl":
        return _trl_op()
    if name == "verl":
        return _verl_op()
    raise ValueError(f"case {name!r} has no op builder")


def _liger_grpo(batch: dict):
    liger = importlib.import_module("liger_kernel.transformers.grpo_loss")
    mask = batch["mask"]

    def loss(logits):
        # Liger wants [B, L+1, V] logits (it drops the last position), so it scores L-1 tokens of our L.
        out = liger.triton_grpo_loss(
            logits, batch["old_logp"][:, :-1], batch["ref_logp"][:, :-1], batch["targets"][:, :-1],
            batch["advantages"], mask[:, :-1].to(torch.int32), temperature=1.0, beta=0.04, eps_low=0.2,
            eps_high=0.2, inplace=True,
        )
        per_token = out[0] if isinstance(out, tuple) else out
        if per_token.dim() == 0:
            return per_token
        m = mask[:, :-1].to(per_token.dtype)
        return (per_token * m).sum() / m.sum()

    return loss


def build_loss(name: str, method: str, batch: dict) -> Callable:
    """A function logits [B, L, V] -> scalar loss of `method` on `batch`."""
    if name in ("naive", "naive-compiled"):
        from erpo import LossConfig

        naive = importlib.import_module(NAIVE_MODULE)
        config = LossConfig(method=method)
        fn = lambda logits: _scalar(naive.naive_policy_loss(logits, batch, config))  # noqa: E731
        return torch.compile(fn) if name == "naive-compiled" else fn
    if name == "erpo":
        from erpo import LossConfig, policy_loss

        config = LossConfig(method=method)
        return lambda logits: _scalar(policy_loss(logits, batch, config))
    if name == "liger":
        return _liger_grpo(batch)
    raise ValueError(f"case {name!r} has no loss builder")


def _scalar(result):
    """policy_loss returns a result with .loss; accept a bare tensor too."""
    return getattr(result, "loss", result)
