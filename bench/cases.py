"""The table of what is compared: each case is a name, the kinds it runs ("op": the bare logprobs+entropy,
"loss": a full policy loss, "linear": a full policy loss from the hidden states and the LM head), where it
can run, and a builder of the function under test.

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
LINEAR_METHODS = ("dapo", "kl_cov")  # a row-local loss (one-pass schedule) and a batch-wide one (two-pass)
MODES = {"op": ("fwd", "fwdbwd"), "loss": ("fwdbwd",), "linear": ("fwdbwd",)}  # a loss is only used for training


@dataclass(frozen=True)
class Case:
    name: str
    kinds: tuple
    needs_cuda: bool = False
    inplace: bool = False  # the backward overwrites the logits: needs graph-output logits, fwd+bwd only
    optional: bool = False  # a run-time failure means "not available here", not "broken"
    methods: tuple = LOSS_METHODS
    linear_methods: tuple = LINEAR_METHODS
    # Returns the reason this case cannot run here, or None.
    unavailable: Callable[[], Optional[str]] = lambda: None

    def runs(self, kind: str, mode: str) -> bool:
        return kind in self.kinds and not (self.inplace and mode == "fwd")

    def methods_of(self, kind: str) -> tuple:
        """The loss methods this case runs for `kind` ((None,) for the bare op)."""
        return {"loss": self.methods, "linear": self.linear_methods}.get(kind, (None,))


def methods_of_kind(kind: str) -> tuple:
    return {"loss": LOSS_METHODS, "linear": LINEAR_METHODS}.get(kind, (None,))


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
    Case("naive", ("op", "loss", "linear"), unavailable=_import_reason(NAIVE_MODULE, "the naive reference")),
    Case("naive-compiled", ("op", "loss"), optional=True, unavailable=_import_reason(NAIVE_MODULE, "the naive reference")),
    Case("erpo-torch", ("op",)),
    Case("erpo-torch-inplace", ("op",), inplace=True),
    Case("erpo-triton", ("op",), needs_cuda=True),
    Case("erpo-triton-inplace", ("op",), needs_cuda=True, inplace=True),
    Case("erpo-cuda", ("op",), needs_cuda=True, unavailable=_cuda_extension_reason),
    Case("erpo-cuda-inplace", ("op",), needs_cuda=True, inplace=True, unavailable=_cuda_extension_reason),
    Case("erpo", ("loss", "linear"), unavailable=_import_reason("erpo.losses", "erpo.losses")),
    Case("erpo-head-torch", ("linear",)),
    Case("erpo-head-torch-2pass", ("linear",), linear_methods=("dapo",)),
    Case("erpo-head-triton", ("linear",), needs_cuda=True,
         unavailable=_import_reason("erpo.kernels.linear_logprobs_entropy", "the fused-head Triton kernel")),
    Case("trl", ("op",), optional=True, unavailable=_import_reason("trl.trainer.utils", "trl")),
    Case("verl", ("op",), optional=True, unavailable=_import_reason("verl.utils.torch_functional", "verl")),
    Case("liger", ("loss",), needs_cuda=True, optional=True, methods=("grpo",),
         unavailable=_import_reason("liger_kernel.transformers.grpo_loss", "liger_kernel")),
    Case("liger-fused-linear", ("linear",), optional=True, linear_methods=("dapo",),
         unavailable=_import_reason("liger_kernel.chunked_loss.grpo_loss", "liger_kernel")),
    Case("erpo-token-loss", ("linear",), linear_methods=("dapo",)),
    Case("trl-chunked", ("linear",), optional=True,
         unavailable=_import_reason("trl.kernels.chunked_logprob", "TRL's ChunkedLogProbFunction")),
    Case("verl-linear-ce", ("linear",), needs_cuda=True, optional=True,
         unavailable=_import_reason("verl.utils.kernel.linear_cross_entropy", "verl's linear_cross_entropy")),
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


# ---- the "linear" kind: (hidden [N, H], weight [V, H]) -> scalar loss -----------------------------------

def _materialized(loss_fn, batch: dict, shape):
    """h @ W.T materialized as [B, L, V] logits, then a loss on them (what every user does today)."""
    return lambda hidden, weight: loss_fn((hidden @ weight.T).view(*shape))


def _liger_fused_linear(method: str, batch: dict):
    from liger_kernel.chunked_loss.grpo_loss import LigerFusedLinearGRPOLoss

    if method != "dapo":
        raise ValueError("the Liger case runs DAPO only")
    # DAPO as erpo's preset: eps 0.2/0.28, token-mean over the valid tokens, no KL (so no reference pass).
    loss = LigerFusedLinearGRPOLoss(beta=0.0, compiled=False, use_ref_model=False, epsilon_low=0.2,
                                    epsilon_high=0.28, loss_type="dapo")
    b, seq_len = batch["targets"].shape

    def run(hidden, weight):
        out = loss(hidden.view(b, seq_len, -1), weight, batch["targets"], batch["mask"].to(torch.int64),
                   batch["advantages"], old_per_token_logps=batch["old_logp"])
        return out[0] if isinstance(out, tuple) else out

    return run


def _verl_linear(method: str, batch: dict):
    from verl.utils.kernel.linear_cross_entropy import linear_cross_entropy

    from erpo import LossConfig
    from erpo.losses.batch import prepare_tokens
    from erpo.losses.policy_loss import loss_from_token_stats

    config = LossConfig(method=method)
    b, seq_len = batch["targets"].shape

    def run(hidden, weight):
        # verl's fused head (GPU only; weight in the lm_head [V, H] layout, as verl's actor passes it) gives logp
        # and entropy; erpo's [N] middle makes the loss of them. Unverified here (no GPU): the run's agreement
        # check against naive says whether the call is right.
        flat = prepare_tokens((b, seq_len), weight.shape[0], hidden.device, torch.float32, batch, config, "hidden")
        logp, entropy = linear_cross_entropy(hidden, weight, flat.targets.reshape(-1).clamp_min(0), 1.0, "none")
        return loss_from_token_stats(logp, entropy, flat, config, "torch").loss

    return run


def _erpo_token_loss(method: str, batch: dict):
    """DAPO written as a per-token function of (logp, entropy) for erpo.linear_token_loss: what a TRL-style trainer
    hands the one-pass entry (clip 0.2 / 0.28, token-mean over the valid tokens, no KL)."""
    from erpo import linear_token_loss

    if method != "dapo":
        raise ValueError("the token-loss case runs DAPO only")
    b, seq_len = batch["targets"].shape
    mask = batch["mask"].float()
    targets = torch.where(batch["mask"].bool(), batch["targets"], -100)
    inputs = {"adv": batch["advantages"][:, None].expand(b, seq_len).float(), "old": batch["old_logp"].float(),
              "weight": mask / mask.sum()}

    def dapo(logp, entropy, adv, old, weight):
        ratio = torch.exp(logp - old)
        return -torch.minimum(ratio * adv, ratio.clamp(1 - 0.2, 1 + 0.28) * adv) * weight

    return lambda hidden, weight: linear_token_loss(hidden.view(b, seq_len, -1), weight, targets, dapo, inputs)[0]


def _trl_chunked(method: str, batch: dict):
    import trl.trainer.utils as trl_utils
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    from erpo import LossConfig
    from erpo.losses.batch import prepare_tokens
    from erpo.losses.policy_loss import loss_from_token_stats

    config = LossConfig(method=method)
    b, seq_len = batch["targets"].shape
    chunk = trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE  # the vocabulary tile TRL 1.16's GRPOTrainer passes

    def run(hidden, weight):
        # TRL 1.16's fused head (cuBLAS tiles folded by Triton on GPU, by torch elsewhere) gives logp and entropy;
        # erpo's [N] middle makes the loss of them, as for verl's head.
        flat = prepare_tokens((b, seq_len), weight.shape[0], hidden.device, torch.float32, batch, config, "hidden")
        logp, entropy, *_ = ChunkedLogProbFunction.apply(hidden, weight, None, flat.targets.reshape(-1).clamp_min(0),
                                                         1.0, chunk, None, 1.0, ("entropy",))
        return loss_from_token_stats(logp, entropy, flat, config, "torch").loss

    return run


def build_linear(name: str, method: str, batch: dict) -> Callable:
    """A function (hidden [N, H], weight [V, H]) -> scalar loss of `method` on `batch` ([B, L] layout)."""
    from erpo import LossConfig

    config = LossConfig(method=method)
    b, seq_len = batch["targets"].shape
    shape = (b, seq_len, -1)
    if name == "naive":
        naive = importlib.import_module(NAIVE_MODULE)
        return _materialized(lambda logits: _scalar(naive.naive_policy_loss(logits, batch, config)), batch, shape)
    if name == "erpo":
        from erpo import policy_loss

        return _materialized(lambda logits: _scalar(policy_loss(logits, batch, config)), batch, shape)
    if name.startswith("erpo-head-"):
        from erpo import linear_policy_loss

        backend = name.split("-")[2]
        schedule = "two_pass" if name.endswith("-2pass") else "auto"
        return lambda hidden, weight: linear_policy_loss(
            hidden.view(b, seq_len, -1), weight, batch, config, schedule=schedule, head_backend=backend
        ).loss
    if name == "liger-fused-linear":
        return _liger_fused_linear(method, batch)
    if name == "verl-linear-ce":
        return _verl_linear(method, batch)
    if name == "trl-chunked":
        return _trl_chunked(method, batch)
    if name == "erpo-token-loss":
        return _erpo_token_loss(method, batch)
    raise ValueError(f"case {name!r} has no linear builder")
