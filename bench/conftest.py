"""pytest-benchmark suite setup (`pytest bench/ --benchmark-only`; plain `pytest` collects only tests/).

Triton's kernels import only with a GPU driver or the interpreter, so TRITON_INTERPRET is set before erpo is
imported when there is no CUDA device (the Triton cases themselves run only on a GPU).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
