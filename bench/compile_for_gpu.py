"""Compile every Triton kernel of erpo for real GPU targets without a GPU; print what the PTX shows, as JSON.

Run in a process without TRITON_INTERPRET (under the interpreter @triton.jit makes Python functions, which
cannot be compiled): `python -m bench.compile_for_gpu`. The arguments are specialised the way
`@triton.jit` specialises them at launch for the shapes that matter (pointers, row strides and V divisible by
16, e.g. V = 151936). One spec, two users: the static report (bench/static_kernels.py) and the CI compile test
(tests/kernels/test_triton_compiles_for_gpu.py).
"""
import itertools
import json
import re
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from bench.static import ptxas_report

from erpo.kernels.logprobs_entropy import (CONFIGS, logprobs_entropy_bwd_kernel, logprobs_entropy_fwd_kernel,
                                           logprobs_entropy_merge_kernel, logprobs_entropy_partial_kernel,
                                           REPLAY_BLOCK_K, SUPPORT_FWD_BLOCK_V, replay_bwd_kernel,
                                           replay_fwd_kernel, support_bwd_kernel, support_fwd_kernel)
from erpo.kernels import linear_logprobs_entropy as head
from erpo.kernels.policy_loss import policy_loss_token_kernel

ARCHS = (80, 90)
DTYPES = ("bf16", "fp16", "fp32")


# The configuration the static report reads: the first autotune candidate (the others are tuned on a GPU).
BLOCK_V, NUM_WARPS, NUM_STAGES = CONFIGS[0]


def row_signature(dtype):
    return {"logits_ptr": f"*{dtype}", "stride_outer": "i64", "stride_inner": "i64", "inner": "i64"}


# The logit transform's runtime scalars (erpo/ops/row_stats.py logit_transform) and its constexpr.
TRANSFORM = {"x_scale": "fp32", "cap_in": "fp32"}


def forward_case(dtype, softcap=False):
    signature = {
        **row_signature(dtype), "targets_ptr": "*i64", "logp_ptr": "*fp32", "entropy_ptr": "*fp32",
        "lse_ptr": "*fp32", "vocab": "i32", **TRANSFORM, "ignore_index": "i32", "BLOCK_V": "constexpr",
        "HAS_SOFTCAP": "constexpr",
    }
    divisible = ("logits_ptr", "stride_outer", "stride_inner", "targets_ptr", "logp_ptr", "entropy_ptr", "lse_ptr",
                 "vocab")
    constexprs = {"BLOCK_V": BLOCK_V, "HAS_SOFTCAP": softcap}
    return logprobs_entropy_fwd_kernel, signature, constexprs, divisible, NUM_WARPS


def partial_case(dtype):
    signature = {
        **row_signature(dtype), "targets_ptr": "*i64", "state_ptr": "*fp32", "vocab": "i32", "chunk": "i32",
        "n_chunks": "i32", **TRANSFORM, "ignore_index": "i32", "BLOCK_V": "constexpr", "HAS_SOFTCAP": "constexpr",
    }
    divisible = ("logits_ptr", "stride_outer", "stride_inner", "targets_ptr", "state_ptr", "vocab", "chunk")
    return (logprobs_entropy_partial_kernel, signature, {"BLOCK_V": BLOCK_V, "HAS_SOFTCAP": False}, divisible,
            NUM_WARPS)


def merge_case(dtype):
    signature = {
        **row_signature(dtype), "targets_ptr": "*i64", "state_ptr": "*fp32", "logp_ptr": "*fp32",
        "entropy_ptr": "*fp32", "lse_ptr": "*fp32", "vocab": "i32", "n_chunks": "i32", **TRANSFORM,
        "ignore_index": "i32", "BLOCK_CHUNKS": "constexpr", "HAS_SOFTCAP": "constexpr",
    }
    divisible = ("logits_ptr", "stride_outer", "stride_inner", "targets_ptr", "state_ptr", "vocab")
    return logprobs_entropy_merge_kernel, signature, {"BLOCK_CHUNKS": 64, "HAS_SOFTCAP": False}, divisible, 1


def backward_case(dtype, has_logp, has_entropy, softcap=False):
    signature = {
        **row_signature(dtype), "grad_ptr": f"*{dtype}", "grad_stride_outer": "i64", "grad_stride_inner": "i64",
        "targets_ptr": "*i64", "lse_ptr": "*fp32", "entropy_ptr": "*fp32", "grad_logp_ptr": "*fp32",
        "grad_entropy_ptr": "*fp32", "vocab": "i32", "chunk": "i32", **TRANSFORM, "grad_scale": "fp32",
        "ignore_index": "i32", "HAS_GRAD_LOGP": "constexpr", "HAS_GRAD_ENTROPY": "constexpr", "BLOCK_V": "constexpr",
        "HAS_SOFTCAP": "constexpr",
    }
    divisible = ("logits_ptr", "stride_outer", "stride_inner", "grad_ptr", "grad_stride_outer", "grad_stride_inner",
                 "targets_ptr", "lse_ptr", "entropy_ptr", "grad_logp_ptr", "grad_entropy_ptr", "vocab", "chunk")
    constexprs = {"HAS_GRAD_LOGP": has_logp, "HAS_GRAD_ENTROPY": has_entropy, "BLOCK_V": BLOCK_V,
                  "HAS_SOFTCAP": softcap}
    return logprobs_entropy_bwd_kernel, signature, constexprs, divisible, NUM_WARPS


def support_forward_case(dtype):
    """The forward over a truncated support (recompute: tau per row), at its block and the plain forward's warps."""
    outputs = ("logp_s_ptr", "entropy_s_ptr", "lse_s_ptr", "logp_ptr", "entropy_ptr", "lse_ptr", "size_ptr",
               "added_ptr")
    signature = {**row_signature(dtype), "targets_ptr": "*i64", "tau_ptr": "*fp32",
                 **{name: "*fp32" for name in outputs}, "vocab": "i32", "x_scale": "fp32", "ignore_index": "i32",
                 "BLOCK_V": "constexpr"}
    divisible = ("logits_ptr", "stride_outer", "stride_inner", "targets_ptr", "tau_ptr", *outputs, "vocab")
    return support_fwd_kernel, signature, {"BLOCK_V": SUPPORT_FWD_BLOCK_V}, divisible, NUM_WARPS


def support_backward_case(dtype):
    """The backward over a truncated support: both gradients' terms in one pass."""
    per_row = ("tau_ptr", "lse_s_ptr", "entropy_s_ptr", "lse_ptr", "entropy_ptr", "grad_logp_s_ptr",
               "grad_entropy_s_ptr", "grad_logp_ptr", "grad_entropy_ptr")
    signature = {**row_signature(dtype), "grad_ptr": f"*{dtype}", "grad_stride_outer": "i64",
                 "grad_stride_inner": "i64", "targets_ptr": "*i64", **{name: "*fp32" for name in per_row},
                 "vocab": "i32", "chunk": "i32", "x_scale": "fp32", "ignore_index": "i32", "BLOCK_V": "constexpr"}
    divisible = ("logits_ptr", "stride_outer", "stride_inner", "grad_ptr", "grad_stride_outer", "grad_stride_inner",
                 "targets_ptr", *per_row, "vocab", "chunk")
    return support_bwd_kernel, signature, {"BLOCK_V": BLOCK_V}, divisible, NUM_WARPS


def replay_forward_case(dtype):
    """Replay over recorded kept sets: a gather of the K kept logits per row (sorted int64 ids)."""
    outputs = ("logp_s_ptr", "entropy_s_ptr", "lse_s_ptr", "size_ptr")
    signature = {**row_signature(dtype), "targets_ptr": "*i64", "ids_ptr": "*i64",
                 **{name: "*fp32" for name in outputs}, "vocab": "i32", "k": "i32", "x_scale": "fp32",
                 "ignore_index": "i32", "BLOCK_K": "constexpr"}
    divisible = ("logits_ptr", "stride_outer", "stride_inner", "targets_ptr", "ids_ptr", *outputs, "vocab", "k")
    return replay_fwd_kernel, signature, {"BLOCK_K": REPLAY_BLOCK_K}, divisible, 4


def replay_backward_case(dtype, accumulate=True):
    """The replay gradient over S at the K kept ids: added to the plain backward's (ACCUMULATE), or stored into
    zeros (the S-only path of logprobs_and_entropy)."""
    per_row = ("lse_s_ptr", "entropy_s_ptr", "grad_logp_s_ptr", "grad_entropy_s_ptr")
    signature = {**row_signature(dtype), "grad_ptr": f"*{dtype}", "grad_stride_outer": "i64",
                 "grad_stride_inner": "i64", "targets_ptr": "*i64", "ids_ptr": "*i64",
                 **{name: "*fp32" for name in per_row}, "vocab": "i32", "k": "i32", "x_scale": "fp32",
                 "ignore_index": "i32", "ACCUMULATE": "constexpr", "BLOCK_K": "constexpr"}
    divisible = ("logits_ptr", "stride_outer", "stride_inner", "grad_ptr", "grad_stride_outer", "grad_stride_inner",
                 "targets_ptr", "ids_ptr", *per_row, "vocab", "k")
    return replay_bwd_kernel, signature, {"ACCUMULATE": accumulate, "BLOCK_K": REPLAY_BLOCK_K}, divisible, 4


def token_case(mode):
    pointers = ("logp_ptr", "entropy_ptr", "old_ptr", "adv_ptr", "ref_ptr", "klcov_ptr", "log_ratio_ptr",
                "seq_coef_ptr", "eps_low_ptr", "eps_high_ptr", "kl_weight_ptr", "pg_weight_ptr", "loss_ptr",
                "dlogp_ptr", "dentropy_ptr")
    signature = {name: "*fp32" for name in pointers}
    signature.update({"clip_low_ptr": "*i8", "clip_high_ptr": "*i8", "n": "i32"})
    signature.update({name: "fp32" for name in (
        "eps_low", "eps_high", "clip_lo", "clip_hi", "dual_clip_c", "kl_coef", "entropy_coef", "delta", "cispo_max",
        "sapo_tau_pos", "sapo_tau_neg")})
    mode = {**TOKEN_MODE_DEFAULTS, **mode}
    signature.update({name: "constexpr" for name in (*mode, "BLOCK")})
    divisible = (*pointers, "clip_low_ptr", "clip_high_ptr", "n")
    return policy_loss_token_kernel, signature, {**mode, "BLOCK": 1024}, divisible, 4


TOKEN_MODE_DEFAULTS = dict(
    OBJECTIVE=0, DUAL_CLIP=False, HAS_DELTA=False, CISPO_UPPER=True, HAS_REF=False, KL_EST=1, KL_BIAS=False,
    HAS_KLCOV=False, HAS_LOG_RATIO=False, HAS_SEQ_COEF=False, HAS_EPS_LOW=False, HAS_EPS_HIGH=False,
    HAS_KL_WEIGHT=False, HAS_PG_WEIGHT=False)
ALL_EXTRAS = dict(HAS_LOG_RATIO=True, HAS_SEQ_COEF=True, HAS_EPS_LOW=True, HAS_EPS_HIGH=True, HAS_KL_WEIGHT=True,
                  HAS_PG_WEIGHT=True)
# Representative modes (OBJECTIVE codes: TokenParams.objective_code): each objective once, each optional
# input and flag in at least one of them.
TOKEN_MODES = {
    "clip-dual-k3": dict(DUAL_CLIP=True, HAS_REF=True, KL_EST=3),
    "noclip-klcov": dict(OBJECTIVE=1, HAS_KLCOV=True),
    "clip-delta-bias-k2-extras": dict(HAS_DELTA=True, DUAL_CLIP=True, HAS_REF=True, KL_EST=2, KL_BIAS=True,
                                      **ALL_EXTRAS),
    "cispo-two-sided-extras": dict(OBJECTIVE=2, CISPO_UPPER=False, HAS_REF=True, KL_EST=3, **ALL_EXTRAS),
    "sapo-k1-bias": dict(OBJECTIVE=3, HAS_REF=True, KL_EST=1, KL_BIAS=True, HAS_LOG_RATIO=True),
    "vespo-pg-weight": dict(OBJECTIVE=4, HAS_SEQ_COEF=True, HAS_PG_WEIGHT=True),
    "gpg-kl-weight": dict(OBJECTIVE=5, HAS_REF=True, KL_EST=3, HAS_KL_WEIGHT=True),
    "gmpo-extras": dict(OBJECTIVE=6, HAS_REF=True, KL_EST=3, **ALL_EXTRAS),
}


def cases():
    for arch, dtype in itertools.product(ARCHS, DTYPES):
        yield f"fwd-sm{arch}-{dtype}", arch, forward_case(dtype)
        yield f"bwd-sm{arch}-{dtype}-both", arch, backward_case(dtype, True, True)
    yield "partial-sm90-bf16", 90, partial_case("bf16")
    yield "merge-sm90-bf16", 90, merge_case("bf16")
    yield "bwd-sm90-bf16-logp", 90, backward_case("bf16", True, False)
    yield "bwd-sm90-bf16-entropy", 90, backward_case("bf16", False, True)
    for arch in ARCHS:  # soft-capped heads (Gemma 2/3): their own HAS_SOFTCAP variant
        yield f"fwd-sm{arch}-bf16-softcap", arch, forward_case("bf16", softcap=True)
        yield f"bwd-sm{arch}-bf16-both-softcap", arch, backward_case("bf16", True, True, softcap=True)
    for arch, dtype in itertools.product(ARCHS, ("bf16", "fp32")):  # over a truncated support (recompute mode)
        yield f"fwd-support-sm{arch}-{dtype}", arch, support_forward_case(dtype)
        yield f"bwd-support-sm{arch}-{dtype}", arch, support_backward_case(dtype)
    for arch in ARCHS:  # replay: gathers, at the widest block of K (REPLAY_BLOCK_K)
        yield f"replay-fwd-sm{arch}-bf16", arch, replay_forward_case("bf16")
        yield f"replay-bwd-sm{arch}-bf16", arch, replay_backward_case("bf16")
    yield "replay-bwd-sm90-bf16-store", 90, replay_backward_case("bf16", accumulate=False)
    for arch, (name, mode) in itertools.product(ARCHS, TOKEN_MODES.items()):
        yield f"token-sm{arch}-{name}", arch, token_case(mode)


def _compile(arch, kernel, signature, constexprs, divisible, options):
    """(PTX, compiled kernel, its `ptxas -v` line) for one spec on one architecture."""
    names = list(signature)
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in divisible}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    ptx = compiled.asm["ptx"]
    # Spills are ptxas's doing and never show in the PTX: read them from `ptxas -v` on this PTX.
    functions, _ = ptxas_report(ptx, "sm_90a" if arch == 90 else f"sm_{arch}")
    return ptx, compiled, functions[compiled.metadata.name]


def compile_case(arch, kernel, signature, constexprs, divisible, num_warps):
    ptx, compiled, ptxas = _compile(arch, kernel, signature, constexprs, divisible, {"num_warps": num_warps})
    return {
        "cubin": "cubin" in compiled.asm,
        "vector_load": bool(re.search(r"\bld\.global(\.[a-z0-9]+)*\.v4\.", ptx)),
        "vector_store": bool(re.search(r"\bst\.global(\.[a-z0-9]+)*\.v4\.", ptx)),
        "registers": ptxas.registers,
        "spill_bytes": ptxas.spill_store_bytes + ptxas.spill_load_bytes,
    }


HEAD_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def head_signature(dtype):
    return {"hidden_ptr": f"*{dtype}", "stride_outer": "i64", "stride_inner": "i64", "inner": "i64",
            "weight_ptr": f"*{dtype}", "bias_ptr": f"*{dtype}", "targets_ptr": "*i64"}


def head_tiles(dtype, has_bias, softcap=False, fp32_head=False):
    """The constexprs at the tiles the launcher picks: those of the compute dtype (fp32 in the fp32 head)."""
    compute = torch.float32 if fp32_head else HEAD_DTYPES[dtype]
    block_n, block_v, block_h, warps, stages = head.GPU_TILES[compute]
    constexprs = {"HAS_BIAS": has_bias, "BLOCK_N": block_n, "BLOCK_V": block_v, "BLOCK_H": block_h,
                  "DOT_PRECISION": head.dot_precision(compute), "HAS_SOFTCAP": softcap, "FP32_HEAD": fp32_head}
    return constexprs, warps, stages


def head_forward_case(dtype, has_bias, softcap=False, fp32_head=False):
    signature = {**head_signature(dtype), "state_ptr": "*fp32"}
    signature.update({name: "i32" for name in ("n_rows", "n_states", "hidden_size", "vocab", "v_per_split")})
    signature.update({**TRANSFORM, "ignore_index": "i32"})
    constexprs, warps, stages = head_tiles(dtype, has_bias, softcap, fp32_head)
    signature.update({name: "constexpr" for name in constexprs})
    divisible = ("hidden_ptr", "stride_outer", "stride_inner", "weight_ptr", "bias_ptr", "targets_ptr", "state_ptr",
                 "n_states", "hidden_size", "vocab", "v_per_split")
    return head.linear_stats_fwd_kernel, signature, constexprs, divisible, warps, stages


def head_backward_case(kernel, dtype, has_bias, has_logp, has_entropy, softcap=False, fp32_head=False):
    signature = {**head_signature(dtype), "lse_ptr": "*fp32", "entropy_ptr": "*fp32", "grad_logp_ptr": "*fp32",
                 "grad_entropy_ptr": "*fp32"}
    outputs = ("grad_hidden_ptr",) if kernel is head.linear_grad_hidden_kernel else ("grad_weight_ptr",
                                                                                      "grad_bias_ptr")
    signature.update({name: "*fp32" for name in outputs})
    signature.update({"n_rows": "i32", "hidden_size": "i32", "vocab": "i32", **TRANSFORM, "grad_scale": "fp32",
                      "ignore_index": "i32"})
    constexprs, warps, stages = head_tiles(dtype, has_bias, softcap, fp32_head)
    constexprs = {"HAS_BIAS": has_bias, "HAS_GRAD_LOGP": has_logp, "HAS_GRAD_ENTROPY": has_entropy, **constexprs}
    signature.update({name: "constexpr" for name in constexprs})
    divisible = ("hidden_ptr", "stride_outer", "stride_inner", "weight_ptr", "bias_ptr", "targets_ptr", "lse_ptr",
                 "entropy_ptr", "grad_logp_ptr", "grad_entropy_ptr", *outputs, "hidden_size", "vocab")
    return kernel, signature, constexprs, divisible, warps, stages


def head_merge_case():
    signature = {"state_ptr": "*fp32", "targets_ptr": "*i64", "logp_ptr": "*fp32", "entropy_ptr": "*fp32",
                 "lse_ptr": "*fp32", "n_rows": "i32", "n_splits": "i32", "n_states": "i32", "ignore_index": "i32",
                 "BLOCK": "constexpr"}
    divisible = ("state_ptr", "targets_ptr", "logp_ptr", "entropy_ptr", "lse_ptr", "n_rows", "n_states")
    return head.linear_stats_merge_kernel, signature, {"BLOCK": head.MERGE_BLOCK}, divisible, 4, 1


def head_cases():
    """The fused LM head kernels (kernels/linear_logprobs_entropy.py) at their GPU tiles."""
    for arch, dtype in itertools.product(ARCHS, DTYPES):
        yield f"head-fwd-sm{arch}-{dtype}", arch, head_forward_case(dtype, True)
        yield f"head-dhidden-sm{arch}-{dtype}", arch, head_backward_case(head.linear_grad_hidden_kernel, dtype,
                                                                            True, True, True)
        yield f"head-dweight-sm{arch}-{dtype}", arch, head_backward_case(head.linear_grad_weight_kernel, dtype,
                                                                            True, True, True)
    yield "head-merge-sm90", 90, head_merge_case()
    yield "head-fwd-sm90-bf16-nobias", 90, head_forward_case("bf16", False)
    yield "head-dhidden-sm90-bf16-logp", 90, head_backward_case(head.linear_grad_hidden_kernel, "bf16", False,
                                                                True, False)
    yield "head-dweight-sm90-bf16-entropy", 90, head_backward_case(head.linear_grad_weight_kernel, "bf16", False,
                                                                   False, True)
    # Soft-capped heads (HAS_SOFTCAP) and the fp32 head over bf16 inputs (FP32_HEAD, at the fp32 tiles)
    for arch, (tag, options) in itertools.product(ARCHS, (("softcap", dict(softcap=True)),
                                                           ("fp32head", dict(fp32_head=True)))):
        yield f"head-fwd-sm{arch}-bf16-{tag}", arch, head_forward_case("bf16", True, **options)
        yield f"head-dhidden-sm{arch}-bf16-{tag}", arch, head_backward_case(head.linear_grad_hidden_kernel, "bf16",
                                                                           True, True, True, **options)
        yield f"head-dweight-sm{arch}-bf16-{tag}", arch, head_backward_case(head.linear_grad_weight_kernel, "bf16",
                                                                           True, True, True, **options)


def compile_head_case(arch, kernel, signature, constexprs, divisible, num_warps, num_stages):
    ptx, compiled, ptxas = _compile(arch, kernel, signature, constexprs, divisible,
                                    {"num_warps": num_warps, "num_stages": num_stages})
    return {
        "cubin": "cubin" in compiled.asm,
        "shared_bytes": compiled.metadata.shared,
        "local_memory": ".local" in ptx,
        "tensor_core_mma": bool(re.search(r"\b(mma\.sync|wgmma\.mma_async)\.", ptx)),
        "tf32_mma": bool(re.search(r"\b(mma\.sync|wgmma\.mma_async)\.[a-z0-9._]*tf32", ptx)),
        "registers": ptxas.registers, "spill_stores": ptxas.spill_store_bytes, "spill_loads": ptxas.spill_load_bytes,
        "stack_frame": ptxas.stack_bytes,
    }


def main():
    report = {}
    for name, arch, case in cases():
        try:
            report[name] = compile_case(arch, *case)
        except Exception as err:  # reported per case: one broken kernel must not hide the others
            report[name] = {"error": f"{type(err).__name__}: {err}"}
    for name, arch, case in head_cases():
        try:
            report[name] = compile_head_case(arch, *case)
        except Exception as err:
            report[name] = {"error": f"{type(err).__name__}: {err}"}
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    main()
