"""Which implementation runs the torch backend's per-chunk bodies: eager torch ops, or `torch.compile` of them.

Eagerly every torch op is one pass over the chunk, and a chunk body is about ten of them; compiled
(inductor, C++ on CPU), the forward body becomes two loops over the chunk and the backward one, with the same
formulas (the same Python function is compiled) and the same chunk-sized memory. Compiling costs seconds
once per process and dtype (inductor caches on disk), so it is used only where it pays: CPU tensors of at
least COMPILE_MIN_ELEMENTS logits per call. `ERPO_TORCH_COMPILE=0` turns it off.

Where compiling fails (no C++ compiler, an inductor bug), a warning says why once and the eager bodies run
from then on; `fallback_reason` keeps the error. Only compile-stack errors fall back: they are raised before
the compiled code writes anything, so the eager rerun of the same chunk reads intact inputs.
"""
import os
import warnings
from typing import Callable, Optional

import torch

COMPILE_MIN_ELEMENTS = 1 << 24  # e.g. 512 rows of a 32k vocabulary; below it the compile time does not pay
ENABLED = os.environ.get("ERPO_TORCH_COMPILE", "1") != "0"
fallback_reason: Optional[str] = None
compiled_calls = 0  # chunks the compiled bodies ran (tests check the compiled path really runs)

_compiled: dict = {}


def _compile_errors() -> tuple:
    """Imported on first use: torch._dynamo takes seconds to import, which eager-only processes never pay."""
    import torch._dynamo.exc
    import torch._inductor.exc

    return torch._dynamo.exc.TorchDynamoException, torch._inductor.exc.CppCompileError


def _wanted(n_elements: int, device: torch.device) -> bool:
    return ENABLED and fallback_reason is None and device.type == "cpu" and n_elements >= COMPILE_MIN_ELEMENTS


def pick(body: Callable, layout, tensor: torch.Tensor) -> Callable:
    """`body` itself, or a compiled twin of it that falls back to `body` when compiling fails."""
    if not _wanted(layout.n_rows * layout.vocab, tensor.device):
        return body
    compiled = _compiled.get(body)
    if compiled is None:
        compiled = _compiled[body] = torch.compile(body, dynamic=True)

    def run(*args):
        global fallback_reason, compiled_calls
        if fallback_reason is not None:
            return body(*args)
        try:
            result = compiled(*args)
        except _compile_errors() as err:
            fallback_reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            warnings.warn(f"erpo: torch.compile of the torch backend's chunk bodies failed ({fallback_reason}); "
                          f"running them eagerly (correct, slower on CPU)", RuntimeWarning, stacklevel=2)
            return body(*args)
        compiled_calls += 1
        return result

    return run
