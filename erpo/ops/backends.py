"""The backends of the fused op, each a module with the same two functions:

    forward(layout, targets, inv_temperature, ignore_index) -> (logp, entropy, lse), flat [N]
    backward(layout, targets, lse, entropy, grad_logp, grad_entropy, inv_temperature, ignore_index, grad_layout)

`layout`/`grad_layout` are RowLayouts (erpo.ops.row_layout); `targets` is a flat, contiguous int32/int64 tensor.
"""
import importlib
import os

BACKENDS = ("auto", "torch", "triton", "cuda")


def resolve(backend: str, is_cuda: bool) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if is_cuda else "torch"
    return backend


def check_available(backend: str, is_cuda: bool) -> None:
    """Fail early, with what to do about it, where a backend cannot run on these tensors."""
    if backend == "triton" and not is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "backend='triton' on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 in the "
            "environment before erpo (and triton) are imported, or use backend='torch'"
        )
    if backend == "cuda" and not is_cuda:
        raise ValueError("backend='cuda' needs CUDA tensors; use backend='torch' on CPU")


def load(backend: str):
    if backend == "torch":
        return importlib.import_module("erpo.ops.torch_logprobs_entropy")
    if backend == "triton":
        return importlib.import_module("erpo.kernels.logprobs_entropy")
    if backend == "cuda":
        return importlib.import_module("erpo.ops.cuda_logprobs_entropy")
    raise ValueError(f"unknown backend {backend!r}")
