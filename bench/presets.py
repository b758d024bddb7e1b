"""The shape sweeps. CPU shapes are small enough that the default sweep takes minutes on two cores; the GPU
sweep is the issue's: N in 1k..32k tokens, V of Llama-2 (32000), Llama-3 (128256) and Qwen2 (151936)."""
from dataclasses import dataclass, field

from bench.inputs import Shape


@dataclass(frozen=True)
class Preset:
    name: str
    shapes: tuple
    repeats: int  # timed calls per case (at least 3 are always taken)
    max_seconds: float  # per case: stop adding timed calls after this, once 3 are in
    isolate: str  # "case": a fresh worker per case (clean CPU peak RSS); "shape": one per shape
    skip: dict = field(default_factory=dict)  # "case" or "case:kind" -> reason it is left out of this preset
    timeout_s: float = 900.0  # per worker
    threads: int = 0  # torch CPU threads in the workers (0: torch's default, one per core)
    loss_shapes: tuple = None  # shapes of the policy-loss cases (default: all shapes)
    linear_shapes: tuple = ()  # shapes (with H) of the fused-head "linear" cases


def _grid(ns, vs, dtypes):
    return tuple(Shape(n, v, d) for d in dtypes for v in vs for n in ns)


PRESETS = {
    "quick": Preset(
        "quick",
        shapes=_grid((64, 256), (1000,), ("float32",)) + _grid((64,), (1000,), ("bfloat16",)),
        repeats=3, max_seconds=1.0, isolate="shape",
        skip={"naive-compiled": "not in --quick: torch.compile takes ~25 s per graph on this CPU"},
        timeout_s=300.0, threads=1,  # one thread: tiny shapes, and no stalls on a busy CI machine
        linear_shapes=(Shape(64, 1000, "float32", 64), Shape(64, 1000, "bfloat16", 64)),
    ),
    "cpu": Preset(
        "cpu",
        shapes=_grid((1024, 2048, 4096), (32000,), ("float32",))
        + _grid((1024,), (128256,), ("float32",))
        + _grid((4096,), (32000,), ("bfloat16",)),
        loss_shapes=_grid((1024, 4096), (32000,), ("float32",)),
        # issue 12's CPU target shape (B*T = 4096, H = 1024, V = 32000, fp32); run it with --threads 1
        linear_shapes=(Shape(4096, 32000, "float32", 1024),),
        repeats=5, max_seconds=10.0, isolate="case",
        skip={"naive-compiled:loss": "left out of the CPU preset for time (the naive loss's Python loops compile "
                                     "for ~60 s per shape here); run it with --cases naive,naive-compiled --kinds loss"},
    ),
    "gpu": Preset(
        "gpu",
        shapes=_grid((1024, 4096, 16384, 32768), (32000, 128256, 151936), ("bfloat16", "float32")),
        repeats=10, max_seconds=3.0, isolate="shape", timeout_s=1800.0,
        # issue 12's GPU target (bf16, H = 4096, V = 151936, N = 8192) and a Llama-2 sized head
        linear_shapes=(Shape(8192, 151936, "bfloat16", 4096), Shape(8192, 32000, "bfloat16", 4096)),
    ),
}
