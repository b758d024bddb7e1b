"""erpo: fused logits kernels and a lean trainer for entropy-regulated RL of language models.

The public names load on first use (PEP 562), so `import erpo` and the `erpo` command's help and argument
errors do not pay for torch, triton and transformers until something needs them.
"""
import importlib

from erpo._kernels_path import ensure_kernels_package

ensure_kernels_package()

__version__ = "0.1.0"
_HOMES = {
    "logprobs_and_entropy": "erpo.ops.logprobs_entropy",
    "linear_logprobs_and_entropy": "erpo.ops.linear_logprobs_entropy",
    "Support": "erpo.ops.support_config",
    "support_ids_from_csr": "erpo.ops.support",
    **{name: "erpo.losses" for name in ("LossConfig", "LossResult", "PolicyLoss", "advantages", "linear_policy_loss",
                                         "linear_token_loss",
                                         "make_controller", "policy_loss", "token_policy_loss")},
}
__all__ = list(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'erpo' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
