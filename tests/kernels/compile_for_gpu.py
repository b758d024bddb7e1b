"""Compile every Triton kernel of erpo for real GPU targets without a GPU; print what the PTX shows, as JSON.

Run in a process without TRITON_INTERPRET (under the interpreter @triton.jit makes Python functions, which
cannot be compiled): `python -m tests.kernels.compile_for_gpu`. The arguments are specialised the way
`@triton.jit` specialises them at launch for the shapes that matter (pointers, row strides and V divisible by
16, e.g. V = 151936).
"""
import itertools
import json
import re
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from bench.static import ptxas_report

from erpo.kernels.logprobs_entropy import (CONFIGS, logprobs_entropy_bwd_kernel, logprobs_entropy_fwd_kernel,
                                           logprobs_entropy_merge_kernel, logprobs_entropy_partial_kernel)
from erpo.kernels.policy_loss import policy_loss_token_kernel

ARCHS = (80, 90)
DTYPES = ("bf16", "fp16", "fp32")


# The configuration the static report reads: the first autotune candidate (the others are tuned on a GPU).
BLOCK_V, NUM_WARPS, NUM_STAGES = CONFIGS[0]


def row_signature(dtype):
    return {"logits_ptr": f"*{dtype}", "stride_outer": "i64", "stride_inner": "i64", "inner": "i64"}


def forward_case(dtype):
    signature = {
        **row_signature(dtype), "targets_ptr": "*i64", "logp_ptr": "*fp32", "entropy_ptr": "*fp32",
        "lse_ptr": "*fp32", "vocab": "i32", "inv_temperature": "fp32", "ignore_index": "i32", "BLOCK_V": "constexpr",
    }
    divisible = ("logits_ptr", "stride_outer", "stride_inner", "targets_ptr", "logp_ptr", "entropy_ptr", "lse_ptr",
                 "vocab")
    return logprobs_entropy_fwd_kernel, signature, {"BLOCK_V": BLOCK_V}, divisible, NUM_WARPS


def partial_case(dtype):
    signature = {
        **row_signature(dtype), "targets_ptr": "*i64", "state_ptr": "*fp32", "vocab": "i32", "chunk": "i32",
        "n_chunks": "i32", "inv_temperature": "fp32", "ignore_index": "i32", "BLOCK_V": "constexpr",
    }
    divisible = ("logits_ptr", "stride_outer", "stride_inner", "targets_ptr", "state_ptr", "vocab", "chunk")
    return logprobs_entropy_partial_kernel, signature, {"BLOCK_V": BLOCK_V}, divisible, NUM_WARPS


def merge_case(dtype):
    signature = {
        **row_signature(dtype), "targets_ptr": "*i64", "state_ptr": "*fp32", "logp_ptr": "*fp32",
        "entropy_ptr": "*fp32", "lse_ptr": "*fp32", "vocab": "i32", "n_chunks": "i32", "inv_temperature": "fp32",
        "ignore_index": "i32", "BLOCK_CHUNKS": "constexpr",
    }
    divisible = ("logits_ptr", "stride_outer", "stride_inner", "targets_ptr", "state_ptr", "vocab")
    return logprobs_entropy_merge_kernel, signature, {"BLOCK_CHUNKS": 64}, divisible, 1


def backward_case(dtype, has_logp, has_entropy):
    signature = {
        **row_signature(dtype), "grad_ptr": f"*{dtype}", "grad_stride_outer": "i64", "grad_stride_inner": "i64",
        "targets_ptr": "*i64", "lse_ptr": "*fp32", "entropy_ptr": "*fp32", "grad_logp_ptr": "*fp32",
        "grad_entropy_ptr": "*fp32", "vocab": "i32", "chunk": "i32", "inv_temperature": "fp32", "ignore_index": "i32",
        "HAS_GRAD_LOGP": "constexpr", "HAS_GRAD_ENTROPY": "constexpr", "BLOCK_V": "constexpr",
    }
    divisible = ("logits_ptr", "stride_outer", "stride_inner", "grad_ptr", "grad_stride_outer", "grad_stride_inner",
                 "targets_ptr", "lse_ptr", "entropy_ptr", "grad_logp_ptr", "grad_entropy_ptr", "vocab", "chunk")
    constexprs = {"HAS_GRAD_LOGP": has_logp, "HAS_GRAD_ENTROPY": has_entropy, "BLOCK_V": BLOCK_V}
    return logprobs_entropy_bwd_kernel, signature, constexprs, divisible, NUM_WARPS


def token_case(mode):
    pointers = ("logp_ptr", "entropy_ptr", "old_ptr", "adv_ptr", "ref_ptr", "klcov_ptr", "loss_ptr", "dlogp_ptr",
                "dentropy_ptr")
    signature = {name: "*fp32" for name in pointers}
    signature.update({"clip_low_ptr": "*i8", "clip_high_ptr": "*i8", "n": "i32"})
    signature.update({name: "fp32" for name in ("eps_low", "eps_high", "dual_clip_c", "kl_coef", "entropy_coef")})
    signature.update({name: "constexpr" for name in (*mode, "BLOCK")})
    divisible = (*pointers, "clip_low_ptr", "clip_high_ptr", "n")
    return policy_loss_token_kernel, signature, {**mode, "BLOCK": 1024}, divisible, 4


TOKEN_MODES = {
    "clip-dual-k3": dict(NO_CLIP=False, DUAL_CLIP=True, HAS_REF=True, KL_EST=3, HAS_KLCOV=False),
    "noclip-klcov": dict(NO_CLIP=True, DUAL_CLIP=False, HAS_REF=False, KL_EST=1, HAS_KLCOV=True),
}


def cases():
    for arch, dtype in itertools.product(ARCHS, DTYPES):
        yield f"fwd-sm{arch}-{dtype}", arch, forward_case(dtype)
        yield f"bwd-sm{arch}-{dtype}-both", arch, backward_case(dtype, True, True)
    yield "partial-sm90-bf16", 90, partial_case("bf16")
    yield "merge-sm90-bf16", 90, merge_case("bf16")
    yield "bwd-sm90-bf16-logp", 90, backward_case("bf16", True, False)
    yield "bwd-sm90-bf16-entropy", 90, backward_case("bf16", False, True)
    for arch, (name, mode) in itertools.product(ARCHS, TOKEN_MODES.items()):
        yield f"token-sm{arch}-{name}", arch, token_case(mode)


def compile_case(arch, kernel, signature, constexprs, divisible, num_warps):
    names = list(signature)
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in divisible}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    ptx = compiled.asm["ptx"]
    # Spills are ptxas's doing and never show in the PTX: read them from `ptxas -v` on this PTX.
    functions, _ = ptxas_report(ptx, "sm_90a" if arch == 90 else f"sm_{arch}")
    ptxas = functions[compiled.metadata.name]
    return {
        "cubin": "cubin" in compiled.asm,
        "vector_load": bool(re.search(r"\bld\.global(\.[a-z0-9]+)*\.v4\.", ptx)),
        "vector_store": bool(re.search(r"\bst\.global(\.[a-z0-9]+)*\.v4\.", ptx)),
        "registers": ptxas.registers,
        "spill_bytes": ptxas.spill_store_bytes + ptxas.spill_load_bytes,
    }


def main():
    report = {}
    for name, arch, case in cases():
        try:
            report[name] = compile_case(arch, *case)
        except Exception as err:  # reported per case: one broken kernel must not hide the others
            report[name] = {"error": f"{type(err).__name__}: {err}"}
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    main()
