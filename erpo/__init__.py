"""erpo: fused logits kernels and a lean trainer for entropy-regulated RL of language models."""
from erpo._kernels_path import ensure_kernels_package

ensure_kernels_package()

from erpo.ops.logprobs_entropy import logprobs_and_entropy  # noqa: E402
from erpo.ops.linear_logprobs_entropy import linear_logprobs_and_entropy  # noqa: E402
from erpo.losses import (  # noqa: E402
    LossConfig, LossResult, PolicyLoss, advantages, linear_policy_loss, make_controller, policy_loss, token_policy_loss,
)

__version__ = "0.1.0"
__all__ = [
    "logprobs_and_entropy", "linear_logprobs_and_entropy", "policy_loss", "linear_policy_loss", "LossConfig",
    "LossResult", "PolicyLoss", "advantages", "make_controller", "token_policy_loss",
]
