"""The kernels the static report (bench/static.py) compiles and reads, one row each: extend the tables here.

A Triton row names a case function of tests/kernels/compile_for_gpu.py (the compile spec the CI compile test
uses: signature, constexprs, divisibility, warps; one spec, two users) and says what the kernel streams:
  elements_per_step  logits one program consumes per trip of its loop over V (BLOCK_V), or per program for a
                     flat kernel without a loop (BLOCK);
  element_bytes      size of one streamed element (the logits' dtype; 4 for the fp32 token arrays);
  hbm_bytes          HBM bytes each element costs this kernel (read once: element_bytes; read + gradient
                     write: 2 x element_bytes; the token kernel: its 4 fp32 inputs, 3 fp32 + 2 int8 outputs);
  loop               True when the steady state is a loop over V (the row kernels), False for flat kernels.
To add a kernel (e.g. the fused head's): give it a case function in tests/kernels/compile_for_gpu.py, then one
TritonRow here per (arch, dtype) that matters: `for arch in ARCHS: yield TritonRow("head-fwd", dtype, arch,
head_forward_case(dtype), elements_per_step=..., element_bytes=..., hbm_bytes=..., loop=True)`.
CUDA rows name a csrc/*.cu file and a regular expression matching the mangled kernel name.
"""
import itertools
from dataclasses import dataclass
from typing import Any

ARCHS = (80, 90)
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclass(frozen=True)
class TritonRow:
    kernel: str  # short name in the report
    dtype: str
    arch: int
    spec: Any  # (jit function, signature, constexprs, divisible, num_warps) from compile_for_gpu
    elements_per_step: int
    element_bytes: int
    hbm_bytes: float
    loop: bool = True
    num_stages: int = 3  # Triton's default; the fused op's rows say what their launch uses
    suffix: str = ""

    @property
    def name(self) -> str:
        return f"{self.kernel}-sm{self.arch}-{self.dtype}{self.suffix}"

    @property
    def num_warps(self) -> int:
        return self.spec[4]


@dataclass(frozen=True)
class CudaRow:
    kernel: str
    dtype: str
    source: str  # file under csrc/
    symbol: str  # regex on the mangled name
    element_bytes: int
    hbm_bytes: float
    threads: int  # block size the launcher picks at the production V (151,936 -> kMaxThreads)
    elements_per_thread_step: int  # per trip of the streaming loop before unrolling: one 16-byte vector, or 1



def triton_rows():
    """Every Triton kernel of erpo at its production configuration, per arch and dtype."""
    from tests.kernels import compile_for_gpu as specs

    stages = specs.NUM_STAGES
    for arch, dtype in itertools.product(ARCHS, DTYPE_BYTES):
        size = DTYPE_BYTES[dtype]
        fwd = specs.forward_case(dtype)
        yield TritonRow("fwd", dtype, arch, fwd, fwd[2]["BLOCK_V"], size, size, num_stages=stages)
        bwd = specs.backward_case(dtype, True, True)
        yield TritonRow("bwd", dtype, arch, bwd, bwd[2]["BLOCK_V"], size, 2 * size, num_stages=stages)
    for arch in ARCHS:  # the split-V forward's chunk kernel: the same loop as the forward
        partial = specs.partial_case("bf16")
        yield TritonRow("partial", "bf16", arch, partial, partial[2]["BLOCK_V"], 2, 2, num_stages=stages)
    for arch, (mode, flags) in itertools.product(ARCHS, specs.TOKEN_MODES.items()):
        token = specs.token_case(flags)
        flags = {**specs.TOKEN_MODE_DEFAULTS, **flags}  # the modes name only what differs from the defaults
        optional = ("HAS_REF", "HAS_KLCOV", "HAS_LOG_RATIO", "HAS_SEQ_COEF", "HAS_EPS_LOW", "HAS_EPS_HIGH",
                    "HAS_KL_WEIGHT", "HAS_PG_WEIGHT")
        inputs = 4 + sum(bool(flags[name]) for name in optional)
        yield TritonRow(f"token-{mode}", "fp32", arch, token, token[2]["BLOCK"], 4, 4 * inputs + 3 * 4 + 2, loop=False)


def autotune_rows():
    """The fused op's bf16 forward and backward at every autotune candidate, sm_90 (`--configs`)."""
    from erpo.kernels.logprobs_entropy import CONFIGS
    from tests.kernels import compile_for_gpu as specs

    for block, warps, stages in CONFIGS:
        suffix = f"-b{block}w{warps}s{stages}"
        for kernel, case, hbm in (("fwd", specs.forward_case("bf16"), 2), ("bwd", specs.backward_case("bf16", True, True), 4)):
            fn, signature, constexprs, divisible, _ = case
            spec = (fn, signature, {**constexprs, "BLOCK_V": block}, divisible, warps)
            yield TritonRow(kernel, "bf16", 90, spec, block, 2, hbm, num_stages=stages, suffix=suffix)


# Mangled names: the template argument is f (float), 6__half, 13__nv_bfloat16; the backward adds its two masks.
_CUDA_TYPES = {"fp32": "f", "fp16": "6__half", "bf16": "13__nv_bfloat16"}


def cuda_rows():
    for dtype, mangled in _CUDA_TYPES.items():
        size = DTYPE_BYTES[dtype]
        yield CudaRow("cuda-fwd", dtype, "logprobs_entropy.cu", rf"logprobs_entropy_fwd_kernelI{mangled}E", size,
                      size, 512, 16 // size)
        yield CudaRow("cuda-bwd", dtype, "logprobs_entropy.cu", rf"logprobs_entropy_bwd_kernelI{mangled}Lb1ELb1EE",
                      size, 2 * size, 512, 16 // size)
    yield CudaRow("cuda-token", "fp32", "policy_loss_token.cu", r"policy_loss_token_kernel", 4, 4 * 6 + 3 * 4 + 2, 256, 1)
