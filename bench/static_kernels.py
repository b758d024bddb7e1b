"""The kernels the static report (bench/static.py) compiles and reads, one row each: extend the tables here.

A Triton row names a case function of bench/compile_for_gpu.py (the compile spec the CI compile test
uses: signature, constexprs, divisibility, warps; one spec, two users) and says what the kernel streams:
  elements_per_step  logits one program consumes per trip of its loop over V (BLOCK_V), or per program for a
                     flat kernel without a loop (BLOCK);
  element_bytes      size of one streamed element (the logits' dtype; 4 for the fp32 token arrays);
  hbm_bytes          HBM bytes each element costs this kernel (read once: element_bytes; read + gradient
                     write: 2 x element_bytes; the token kernel: its 4 fp32 inputs, 3 fp32 + 2 int8 outputs);
  loop               True when the steady state is a loop over V (the row kernels), False for flat kernels.
To add a streaming kernel: give it a case function in bench/compile_for_gpu.py, then one TritonRow
here per (arch, dtype) that matters.
The fused LM head's kernels are matmul tiles, one HeadRow each (head_rows): the tiles the op launches with
(GPU_TILES of kernels/linear_logprobs_entropy.py, through the same compile_for_gpu cases), how many tl.dot
loops over H each tile runs, the FLOPs and worst-case HBM bytes per logit at the reference hidden size.
CUDA rows name a csrc/*.cu file and a regular expression matching the mangled kernel name.
"""
import itertools
from dataclasses import dataclass
from typing import Any

ARCHS = (80, 90)
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclass(frozen=True)
class CompiledRow:
    """What every Triton row has: the kernel it names and the compile spec it is built from."""
    kernel: str  # short name in the report
    dtype: str
    arch: int
    spec: Any  # (jit function, signature, constexprs, divisible, num_warps) from compile_for_gpu

    suffix = ""  # a class attribute, not a field: TritonRow's autotune rows set their own

    @property
    def name(self) -> str:
        return f"{self.kernel}-sm{self.arch}-{self.dtype}{self.suffix}"

    @property
    def num_warps(self) -> int:
        return self.spec[4]


@dataclass(frozen=True)
class TritonRow(CompiledRow):
    elements_per_step: int
    element_bytes: int
    hbm_bytes: float
    loop: bool = True
    num_stages: int = 3  # Triton's default; the fused op's rows say what their launch uses
    suffix: str = ""


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
    from bench import compile_for_gpu as specs

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
    for arch in ARCHS:  # over a truncated support, recompute mode (docs/support.md): both row states, one pass
        fwd = specs.support_forward_case("bf16")
        yield TritonRow("fwd-support", "bf16", arch, fwd, fwd[2]["BLOCK_V"], 2, 2, num_stages=stages)
        bwd = specs.support_backward_case("bf16")
        yield TritonRow("bwd-support", "bf16", arch, bwd, bwd[2]["BLOCK_V"], 2, 4, num_stages=stages)
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
    from bench import compile_for_gpu as specs

    for block, warps, stages in CONFIGS:
        suffix = f"-b{block}w{warps}s{stages}"
        for kernel, case, hbm in (("fwd", specs.forward_case("bf16"), 2), ("bwd", specs.backward_case("bf16", True, True), 4)):
            fn, signature, constexprs, divisible, _ = case
            spec = (fn, signature, {**constexprs, "BLOCK_V": block}, divisible, warps)
            yield TritonRow(kernel, "bf16", 90, spec, block, 2, hbm, num_stages=stages, suffix=suffix)


# The fused LM head, read at the hidden size of Llama-3-8B (Qwen2.5-7B has 3584): the per-logit figures of
# matmul tiles scale with H, so the report states the one it uses; the JSON holds the parts to redo it at any H.
HEAD_HIDDEN_SIZE = 4096
HEAD_DTYPES = ("bf16", "fp32")  # fp16 compiles to the bf16 code with another MMA type (compile_for_gpu checks it)


@dataclass(frozen=True)
class HeadRow(CompiledRow):
    num_stages: int
    dots: int  # tl.dot loops over H per tile: the recompute, plus the gradient product in the backward
    element_bytes: int
    loop: bool = True

    @property
    def tiles(self) -> tuple:
        c = self.spec[2]
        return c["BLOCK_N"], c["BLOCK_V"], c["BLOCK_H"]

    def flops_per_logit(self, hidden: int) -> float:
        return 2 * hidden * self.dots  # each dot: one multiply-add per element of H per logit

    def hbm_bytes_per_logit(self, hidden: int) -> float:
        """Operand bytes per logit when no tile is ever reused from L2 (the worst case): the forward reads a
        hidden tile per V tile and a weight tile per row tile; grad_hidden reads the weight twice and
        read-adds-writes its f32 [BLOCK_N, H] rows per V tile; grad_weight reads the hidden tile twice and
        read-adds-writes its f32 [BLOCK_V, H] rows per row tile."""
        block_n, block_v, _ = self.tiles
        e = self.element_bytes
        recompute = e * hidden * (1 / block_n + 1 / block_v)
        if self.kernel == "head-fwd":
            return recompute
        if self.kernel == "head-dhidden":
            return recompute + e * hidden / block_n + 8 * hidden / block_v
        return recompute + e * hidden / block_v + 8 * hidden / block_n


def head_rows():
    """The fused LM head's kernels at the tiles the op launches (GPU_TILES), per arch, bf16 and fp32."""
    from erpo.kernels import linear_logprobs_entropy as head
    from bench import compile_for_gpu as specs

    for arch, dtype in itertools.product(ARCHS, HEAD_DTYPES):
        cases = (("head-fwd", specs.head_forward_case(dtype, True), 1),
                 ("head-dhidden", specs.head_backward_case(head.linear_grad_hidden_kernel, dtype, True, True, True), 2),
                 ("head-dweight", specs.head_backward_case(head.linear_grad_weight_kernel, dtype, True, True, True), 2))
        for kernel, case, dots in cases:
            yield HeadRow(kernel, dtype, arch, case[:5], case[5], dots, DTYPE_BYTES[dtype])


def head_merge_rows():
    """The head's merge of the split states: flat, one row of N per element (6 f32 states in at S = 1, the
    int64 target, 3 f32 out)."""
    from erpo.kernels import linear_logprobs_entropy as head
    from bench import compile_for_gpu as specs

    case = specs.head_merge_case()
    for arch in ARCHS:
        yield TritonRow("head-merge", "fp32", arch, case[:5], head.MERGE_BLOCK, 4, 6 * 4 + 8 + 3 * 4, loop=False,
                        num_stages=case[5])


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
