"""Triton kernels of erpo, installed as `erpo.kernels` (never as the bare name `kernels`).

Importing this package does not import triton; each kernel module does, when it is first used.

The bare name `kernels` belongs to Hugging Face's `kernels` package, which transformers (>= 5.25 depends on it)
imports. From a checkout's root (`python -m pytest`, `python -m erpo`) the current directory comes first on
sys.path, so that import would find this folder instead. Imported under the bare name, this module therefore
hands the name over to the real package (or reports it absent, as Python would without this folder).
"""
if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != _checkout]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _path)
    if _spec is None:
        del sys.modules["kernels"]
        raise ModuleNotFoundError("No module named 'kernels'", name="kernels")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module
    _spec.loader.exec_module(_module)
