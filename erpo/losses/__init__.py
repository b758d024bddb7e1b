"""Policy losses of erpo (GRPO family, ERPO, entropy-control methods) on top of the fused logp/entropy op."""
from erpo.losses import advantages
from erpo.losses.config import LossConfig
from erpo.losses.controllers import make_controller
from erpo.losses.linear_policy_loss import linear_policy_loss
from erpo.losses.module import PolicyLoss
from erpo.losses.policy_loss import LossResult, policy_loss, token_policy_loss

__all__ = [
    "LossConfig", "LossResult", "PolicyLoss", "advantages", "linear_policy_loss", "make_controller", "policy_loss",
    "token_policy_loss",
]
