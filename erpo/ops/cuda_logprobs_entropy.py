"""backend='cuda': the CUDA C++ kernels of csrc/, bound to torch by the optional extension `erpo._C`."""


def _extension():
    try:
        from erpo import _C  # noqa: F401
    except ImportError as err:
        raise RuntimeError(
            "backend='cuda' needs erpo's CUDA extension, which is not built in this install. Build it on a "
            "machine with a CUDA build of torch and nvcc: `ERPO_BUILD_CUDA=1 pip install -e . --no-build-isolation`"
        ) from err
    return _C


def forward(layout, targets, inv_temperature, ignore_index):
    _extension()
    raise NotImplementedError("the CUDA kernels of the fused op are not written yet (issue 7)")


def backward(layout, targets, lse, entropy, grad_logp, grad_entropy, inv_temperature, ignore_index, grad_layout):
    _extension()
    raise NotImplementedError("the CUDA kernels of the fused op are not written yet (issue 7)")
