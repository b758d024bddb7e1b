"""The two comparisons bench/gpu_check.sh makes after a GPU sweep (pure JSON in, markdown out: tested on CPU).

  python -m bench.gpu_compare predicted RESULTS_JSON STATIC_JSON   measured vs the static report's prediction
  python -m bench.gpu_compare cuda RESULTS_JSON                    the CUDA op's time vs Triton's (issue 7)

Measured: the sweep's fraction of the datasheet HBM bandwidth (minimal bytes / median time). Predicted: the
static report's fraction for the forward kernel and, for forward+backward, the time-weighted mix of forward
(N V s bytes) and backward (2 N V s bytes): 3 / (1/f_fwd + 2/f_bwd). The static report models the default
configuration at large N; rows under two waves of programs (the split-V path) are marked, not judged.
"""
import argparse
import json
import sys

DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
STATIC_GPU = (("H200", "H200-SXM", 90), ("H100", "H100-SXM5", 90), ("A100", "A100-SXM4-80GB", 80))
KERNELS = {"erpo-triton": ("fwd", "bwd"), "erpo-triton-inplace": ("fwd", "bwd"),
           "erpo-cuda": ("cuda-fwd", "cuda-bwd"), "erpo-cuda-inplace": ("cuda-fwd", "cuda-bwd")}
JUDGED_MIN_TOKENS = 4096  # the prediction is for a full GPU: at least ~8 waves of one-row programs
WITHIN = 0.7  # measured / predicted below this at large N: the model (or the kernel) is off; look at it


def static_gpu(device_name: str):
    for key, gpu, arch in STATIC_GPU:
        if key in (device_name or ""):
            return gpu, arch
    return None, None


def predicted_table(sweep: dict, static: dict) -> tuple[str, list]:
    """(markdown, rows judged off): one line per Triton/CUDA op row of the sweep."""
    meta = sweep.get("meta", {})
    gpu, arch = static_gpu(meta.get("device_name"))
    fractions = {r["kernel"]: r["predicted"][gpu]["predicted_fraction"]  # the fused head's rows predict a
                 for r in static["results"]  # fraction of compute peak, not of HBM: not compared here
                 if gpu and gpu in r.get("predicted", {}) and r.get("kind") != "matmul"}
    lines = [f"Measured vs PREDICTED fraction of HBM bandwidth: {meta.get('device_name')} (static model {gpu}), "
             f"torch {meta.get('torch')}, triton {meta.get('triton')}, {meta.get('date_utc')}", "",
             "| case | mode | dtype | V | N | measured | predicted | measured / predicted |",
             "|---|---|---|---:|---:|---:|---:|---|"]
    off = []
    rows = [r for r in sweep.get("results", []) if r.get("kind") == "op" and r.get("case") in KERNELS
            and r.get("status") == "ok" and "bandwidth_fraction" in r]
    for r in sorted(rows, key=lambda r: (r["case"], r["mode"], r["dtype"], r["vocab"], r["n_tokens"])):
        fwd_name, bwd_name = KERNELS[r["case"]]
        dtype = DTYPES.get(r["dtype"], r["dtype"])
        f_fwd = fractions.get(f"{fwd_name}-sm{arch}-{dtype}")
        f_bwd = fractions.get(f"{bwd_name}-sm{arch}-{dtype}")
        predicted = f_fwd if r["mode"] == "fwd" else (3 / (1 / f_fwd + 2 / f_bwd) if f_fwd and f_bwd else None)
        measured = r["bandwidth_fraction"]
        if predicted is None:
            verdict = "no prediction"
        elif r["n_tokens"] < JUDGED_MIN_TOKENS:
            verdict = f"{measured / predicted:.2f} (small N: not judged)"
        else:
            ratio = measured / predicted
            verdict = f"{ratio:.2f}" + ("" if ratio >= WITHIN else " **OFF**")
            if ratio < WITHIN:
                off.append(r)
        pred_text = f"{predicted:.0%}" if predicted is not None else "-"
        lines.append(f"| {r['case']} | {r['mode']} | {r['dtype']} | {r['vocab']} | {r['n_tokens']} | "
                     f"{measured:.0%} | {pred_text} | {verdict} |")
    if not rows:
        lines.append("| (no Triton/CUDA op rows in the sweep) |||||||")
    lines += ["", f"Rows at N >= {JUDGED_MIN_TOKENS} below {WITHIN:.0%} of the prediction: {len(off)}."]
    return "\n".join(lines) + "\n", off


CUDA_TARGET = 1.10  # issue 7: the CUDA forward+backward within 10% of Triton's time
CUDA_PAIRS = (("erpo-cuda", "erpo-triton"), ("erpo-cuda-inplace", "erpo-triton-inplace"))


def cuda_table(sweep: dict) -> tuple[str, bool]:
    """(markdown, ok): CUDA / Triton time per shape; ok when every forward+backward pair is within 10%."""
    ok_rows = {(r["case"], r["mode"], r["dtype"], r["vocab"], r["n_tokens"]): r["median_s"]
               for r in sweep.get("results", []) if r.get("kind") == "op" and r.get("status") == "ok"}
    meta = sweep.get("meta", {})
    lines = [f"{meta.get('device_name')}, torch {meta.get('torch')}, triton {meta.get('triton')}, "
             f"{meta.get('date_utc')}", "", "| mode | dtype | V | N | case | cuda ms | triton ms | cuda / triton |",
             "|---|---|---:|---:|---|---:|---:|---:|"]
    worst, missing = 0.0, 0
    for mode, dtype, vocab, n in sorted({key[1:] for key in ok_rows}):
        for cuda, triton in CUDA_PAIRS:
            a, b = ok_rows.get((cuda, mode, dtype, vocab, n)), ok_rows.get((triton, mode, dtype, vocab, n))
            if a is None or b is None:
                missing += 1
                lines.append(f"| {mode} | {dtype} | {vocab} | {n} | {cuda} | {a} | {b} | missing |")
                continue
            if mode == "fwdbwd":
                worst = max(worst, a / b)
            lines.append(f"| {mode} | {dtype} | {vocab} | {n} | {cuda} | {a * 1e3:.3f} | {b * 1e3:.3f} | {a / b:.3f} |")
    lines.append(f"\nworst forward+backward cuda/triton: {worst:.3f} (target <= {CUDA_TARGET}); pairs missing: {missing}")
    return "\n".join(lines) + "\n", bool(worst) and worst <= CUDA_TARGET and missing == 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_compare")
    sub = p.add_subparsers(dest="what", required=True)
    pred = sub.add_parser("predicted")
    pred.add_argument("results")
    pred.add_argument("static")
    cuda = sub.add_parser("cuda")
    cuda.add_argument("results")
    args = p.parse_args(argv)
    with open(args.results) as f:
        sweep = json.load(f)
    if args.what == "predicted":
        with open(args.static) as f:
            table, off = predicted_table(sweep, json.load(f))
        print(table)
        return 1 if off else 0
    table, ok = cuda_table(sweep)
    print(table)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
