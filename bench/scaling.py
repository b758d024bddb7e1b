"""Memory per GPU of the loss step (LM head + policy loss, forward and backward), from the shapes alone.

    python -m bench.scaling            # the docs/scaling.md tables (head + gradient at TP 1-8 / FSDP 2-64; the
                                       # loss step at 8k-64k tokens x TP 1-8), H and V from transformers' configs
    python -m bench.scaling --check    # the model against a CPU measurement at a small shape

The loss step starts from the last hidden states [N, H] (N tokens of the micro-batch) and the head weight
[V, H], vocabulary-sharded over TP ranks (V_t = ceil(V / TP) rows per rank), and ends with the gradients of
hidden and of the head. Model-body activations, weights, optimizer state are outside it. Tensors (b = bytes
of the model dtype, 2 for bf16; f = 4, float32):

  logits path (erpo.policy_loss on the model's logits, Triton kernel on GPU):
    logits          N V_t b     the head's output, saved by the op for its backward
    dlogits         N V_t b     the op's gradient (0 with LossConfig(inplace_grad=True))
    grad_hidden     N H b       head matmul backward
    grad_weight     V_t H b     head matmul backward
    row stats       3 N f       logp, entropy, lse
    TP states       TP 4 N f    the one all_gather of the vocabulary-parallel merge (TP > 1)
    chunk temps     backend "torch" only: 3 x CHUNK_ELEMENTS f (chunk copy, exp, gradient chunk), live during
                    the op's backward only, before the head's gradients exist: the excess over them counts
  fused head (erpo.linear_policy_loss; torch backend = "auto"):
    grad_hidden     N H f       + N H b for the cast to the model dtype (b < f only)
    grad_weight     V_t H f     + V_t H b for the cast (b < f only)
    chunk buffers   2 R V_t f   R = min(N, BUDGET_BYTES / (4 V_t)) rows (256 MiB per buffer on CUDA, 8 MiB on CPU)
    low-prec dz     R V_t b     (b < f only: the dlogits chunk rounded for the gradient matmuls)
    row stats       3 N f,  TP states  TP 4 N f  (as above)
  The Triton fused-head backend has no chunk buffers (tiles live in registers); its scratch is 6 S N f with
  S vocabulary splits (S = 1 at these N).
The [N]-sized loss logic (a few dozen [N] float32 vectors) is below 0.1% of any total here and left out.
"""
import argparse
import json
import math
import os
import subprocess
import sys

MIB = 1 << 20
GIB = 1 << 30
# (H, V) of each model family: the defaults of transformers' own config classes (`hidden_size`, `vocab_size` of
# `Class()`), read from the installed transformers at import, never typed in. The checkpoint is the one the class
# docstring says its defaults resemble ("similar configuration to that of ..."): context only, since a class's
# defaults are not always that checkpoint's (Qwen2_5_VLTextConfig's are an 80-layer, 8192-wide 72B-class text
# model while its docstring names a 7B).
CONFIG_CLASSES = {
    "Qwen3Config": "Qwen/Qwen3-8B",
    "MllamaTextConfig": "meta-llama/Llama-3.2-11B-Vision",
    "GemmaConfig": "google/gemma-7b",
    "Llama4TextConfig": "meta-llama/Llama-4-Scout-17B-16E",
    "DeepseekV3Config": "bzantium/tiny-deepseek-v3",
    "Cohere2Config": "CohereForAI/c4ai-command-r-v01",
}


def config_shapes() -> dict:
    """{config class name: (hidden_size, vocab_size)} of each class's defaults in the installed transformers."""
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    return {name: (getattr(transformers, name)().hidden_size, getattr(transformers, name)().vocab_size)
            for name in CONFIG_CLASSES}


MODELS = config_shapes()
TOKENS = (8192, 16384, 32768, 65536)
TP = (1, 2, 4, 8)
FSDP = (2, 8, 64)
F32 = 4
# The backends' own constants (read from the code, so the model follows them).
TORCH_CHUNK_ELEMENTS = 1 << 20  # erpo/ops/torch_logprobs_entropy.CHUNK_ELEMENTS
HEAD_BUDGET = {"cpu": 8 << 20, "cuda": 256 << 20}  # erpo/ops/torch_linear_logprobs_entropy.BUDGET_BYTES
# --check: the measured loss step must be within this of the model (relative, plus an absolute allowance for
# the allocator, the [N]-sized tensors and the interpreter's own pages).
CHECK_RTOL = 0.10
CHECK_ATOL = 8 * MIB


def loss_step_bytes(n: int, h: int, v: int, tp: int = 1, fused: bool = True, dtype_bytes: int = 2,
                    backend: str = "triton", device: str = "cuda", inplace_grad: bool = False) -> dict:
    """Bytes of each tensor the loss step adds, per GPU (see the module docstring for the formulas)."""
    vt = math.ceil(v / tp)
    b = dtype_bytes
    cast = b < F32
    parts = {"row stats": 3 * n * F32}
    if tp > 1:
        parts["TP states"] = tp * 4 * n * F32
    if not fused:
        parts["logits"] = n * vt * b
        parts["dlogits"] = 0 if inplace_grad else n * vt * b
        parts["grad_hidden"] = n * h * b
        parts["grad_weight"] = vt * h * b
        if backend == "torch":  # freed before the head's backward allocates its gradients: only the excess counts
            temps = 3 * min(TORCH_CHUNK_ELEMENTS, n * vt) * F32
            parts["chunk temps"] = max(0, temps - parts["grad_hidden"] - parts["grad_weight"])
        return parts
    parts["grad_hidden"] = n * h * (F32 + (b if cast else 0))
    parts["grad_weight"] = vt * h * (F32 + (b if cast else 0))
    if backend == "torch":
        rows = max(1, min(n, HEAD_BUDGET[device] // (F32 * vt)))
        parts["chunk buffers"] = 2 * rows * vt * F32
        if cast:
            parts["low-prec dz"] = rows * vt * b
    else:
        parts["scratch"] = 6 * n * F32
    return parts


def total(parts: dict) -> int:
    return sum(parts.values())


def head_bytes(h: int, v: int, tp: int = 1, fsdp: int = 1, dtype_bytes: int = 2) -> dict:
    """Bytes per rank of the LM head [V, H] and its gradient with the fused head (erpo.linear_policy_loss).

    TP (vocabulary-parallel, `process_group=`): each rank holds V_t = ceil(V / TP) rows and the loss step's
    gradient of them, float32 + the cast (`V_t H (f + b)`). FSDP2 (`erpo train --fsdp`, the head gathered once
    per micro-batch as TRL does): at rest each rank holds 1/F of the head and of its gradient; in the loss step
    it holds its shard, the gathered full head `V H b` and the full-size gradient `V H (f + b)` before the
    reduce-scatter leaves its 1/F: the peak does not shrink with F, only the resting copies do."""
    b = dtype_bytes
    cast = b < F32
    if fsdp > 1:
        shard = math.ceil(v / fsdp) * h * b
        return {"rest": 2 * shard, "peak": shard + v * h * b + v * h * (F32 + (b if cast else 0)) + shard}
    vt = math.ceil(v / tp)
    both = vt * h * b + vt * h * (F32 + (b if cast else 0))
    return {"rest": 2 * vt * h * b, "peak": both}


def head_table() -> str:
    """GiB per rank of the head and its gradient, bf16 model: TP 1-8 against FSDP2 2-64 (see head_bytes)."""
    lines = ["| config class (its docstring's checkpoint) | H | V | " + " | ".join(f"TP {t}" for t in TP) + " | "
             + " | ".join(f"FSDP {f} peak" for f in FSDP) + " | " + " | ".join(f"FSDP {f} at rest" for f in FSDP)
             + " |", "|---|---:|---:|" + "---:|" * (len(TP) + 2 * len(FSDP))]
    for name, (h, v) in MODELS.items():
        tp = [head_bytes(h, v, tp=t)["peak"] / GIB for t in TP]
        peak = [head_bytes(h, v, fsdp=f)["peak"] / GIB for f in FSDP]
        rest = [head_bytes(h, v, fsdp=f)["rest"] / GIB for f in FSDP]
        lines.append(f"| {name} ({CONFIG_CLASSES[name]}) | {h} | {v} | "
                     + " | ".join(f"{x:.2f}" for x in tp + peak + rest) + " |")
    return "\n".join(lines)


def tables() -> str:
    """Per model: GiB per GPU of the loss step, bf16 model, on the backends "auto" picks on CUDA (the Triton
    kernel for the logits path, the torch fused head) and on the Triton fused head."""
    lines = []
    for name, (h, v) in MODELS.items():
        lines.append(f"\n### {name} (H = {h}, V = {v})\n")
        lines.append("| tokens | TP | logits path GiB | fused head (torch, auto) GiB | fused head (triton) GiB | "
                     "auto fused / logits |")
        lines.append("|---:|---:|---:|---:|---:|---:|")
        for n in TOKENS:
            for tp in TP:
                plain = total(loss_step_bytes(n, h, v, tp, fused=False, backend="triton"))
                fused = total(loss_step_bytes(n, h, v, tp, fused=True, backend="torch"))
                fused_triton = total(loss_step_bytes(n, h, v, tp, fused=True, backend="triton"))
                lines.append(f"| {n // 1024}k | {tp} | {plain / GIB:.2f} | {fused / GIB:.2f} | "
                             f"{fused_triton / GIB:.2f} | {fused / plain:.3f} |")
    return "\n".join(lines)


# --- the CPU check -------------------------------------------------------------------------------------
CHECK_SHAPE = dict(n=2048, h=256, v=16384)


def _measure(fused: bool, n: int, h: int, v: int) -> dict:
    """Run in a fresh worker process: the peak extra memory of one loss step on CPU, float32, torch backend."""
    import torch

    import erpo
    from bench.measure import PeakMemory

    torch.manual_seed(0)
    torch.set_num_threads(1)
    b, l = 16, n // 16
    hidden = torch.randn(b, l, h, requires_grad=True)
    weight = (torch.randn(v, h) * 0.05).requires_grad_()
    targets = torch.randint(0, v, (b, l))
    batch = {"targets": targets, "mask": torch.ones(b, l, dtype=torch.bool),
             "old_logp": -torch.rand(b, l) * 5, "advantages": torch.randn(b)}
    config = erpo.LossConfig(method="grpo", backend="torch", kl_coef=0.0)

    def step():
        if fused:
            result = erpo.linear_policy_loss(hidden, weight, batch, config)
            result.loss.backward()
        else:
            logits = hidden @ weight.T
            result = erpo.policy_loss(logits, batch, config)
            result.loss.backward()
            return logits  # the trainer holds the logits through the backward too

    step()  # warm-up: lazy imports, the BLAS's and the allocator's first-use pages are not the loss step's
    hidden.grad = weight.grad = None  # the measured call allocates its gradients afresh
    with PeakMemory("cpu") as peak:
        kept = step()
    del kept
    return {"extra_bytes": peak.extra_bytes, "method": peak.method}


def measure(fused: bool, n: int, h: int, v: int, timeout_s: int = 600) -> dict:
    from bench.runner import WORKER_ENV

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, **WORKER_ENV, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    code = (f"import json; from bench.scaling import _measure; "
            f"print(json.dumps(_measure({fused}, {n}, {h}, {v})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root,
                         timeout=timeout_s, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def check() -> list:
    """[(path, predicted bytes, measured bytes, within tolerance)] at CHECK_SHAPE, float32 on CPU."""
    rows = []
    for fused in (False, True):
        predicted = total(loss_step_bytes(**CHECK_SHAPE, fused=fused, dtype_bytes=F32, backend="torch", device="cpu"))
        measured = measure(fused, **CHECK_SHAPE)["extra_bytes"]
        ok = abs(measured - predicted) <= CHECK_RTOL * predicted + CHECK_ATOL
        rows.append(("fused head" if fused else "logits path", predicted, measured, ok))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare the model with a CPU measurement")
    args = parser.parse_args()
    if args.check:
        shape = ", ".join(f"{k.upper()} = {v}" for k, v in CHECK_SHAPE.items())
        print(f"CPU, float32, torch backend, {shape}; tolerance {CHECK_RTOL:.0%} + {CHECK_ATOL // MIB} MiB")
        for name, predicted, measured, ok in check():
            print(f"{name}: model {predicted / MIB:.1f} MiB, measured {measured / MIB:.1f} MiB, "
                  f"{'within' if ok else 'OUTSIDE'} tolerance")
        return
    import transformers

    print(f"H, V: defaults of transformers {transformers.__version__}'s config classes\n")
    print(head_table())
    print(tables())


if __name__ == "__main__":
    main()
