"""python -m bench.static: what the GPU code of erpo will do on a GPU, read from the compiler without one.

For every kernel of bench/static_kernels.py (Triton: the fused op's forward and backward, the per-token
loss, the fused LM head's matmul tiles and merge; CUDA: csrc/*.cu), per dtype, for sm_80 and sm_90:
  registers and spills      `ptxas -v` on the PTX Triton generated (Triton's own ptxas and flags), or
                            `nvcc -Xptxas -v` for the CUDA files; cross-checked against the cubin;
  SASS                      `cuobjdump -sass` of the cubin that would run; the steady-state loop (the loop
                            with the most 16-byte loads), its instruction mix, instructions per element;
  occupancy                 from registers, threads and shared memory;
  PREDICTED bandwidth       fraction of HBM bandwidth on A100 (sm_80), H100 and H200 (sm_90), from the
                            instruction count with the model in bench/static_sass.py. Never measured here.
  fused LM head             matmul tiles, in a table of their own: SASS per logit of the recomputed tile at
                            H = HEAD_HIDDEN_SIZE (dot loops x trips + the rest of the tile loop), MMA
                            instructions per trip with their multiply-adds, and a PREDICTED fraction of the
                            tensor-core (fp32: FP32-pipe) peak beside a worst-case HBM bound.
Writes bench/results/static/static.md and static.json (or --out DIR). Exit status 1 when any kernel spills
or fails to compile, so CI fails on spills (tests/kernels/test_static_report.py).
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import static_sass as sass
from bench.static_kernels import (ARCHS, HEAD_HIDDEN_SIZE, autotune_rows, cuda_rows, head_merge_rows, head_rows,
                                  triton_rows)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench" / "results" / "static"
NVCC_FLAGS = ("-O3", "-std=c++17", "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
              "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__")


# ---------------------------------------------------------------- tools

def tool(name: str) -> str:
    """ptxas / cuobjdump: Triton's bundled copy (the ptxas Triton compiles with), else PATH, else the
    nvidia-cuda-cuobjdump / nvidia-cuda-nvcc pip packages."""
    try:
        from triton import knobs

        path = getattr(knobs.nvidia, name).path
        if path and os.path.exists(path):
            return path
    except Exception:  # an older triton without knobs: fall through to PATH
        pass
    found = shutil.which(name)
    if found:
        return found
    try:
        import nvidia

        for root in nvidia.__path__:
            for candidate in Path(root).glob(f"*/bin/{name}"):
                return str(candidate)
    except ImportError:
        pass
    raise FileNotFoundError(f"{name} not found (triton's bundled copy, PATH, or `pip install nvidia-cuda-{name}`)")


def run(cmd, **kw) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    if done.returncode:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done


def ptxas_report(ptx: str, arch_name: str, extra=()) -> tuple[dict, bytes]:
    """`ptxas -v` with Triton's own flags on a PTX text: (per-function PtxasFunction, cubin bytes)."""
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp, "k.ptx"), Path(tmp, "k.cubin")
        src.write_text(ptx)
        done = run([tool("ptxas"), "-lineinfo", "-v", "--regAllocOptLevel=2", *extra, f"--gpu-name={arch_name}",
                    str(src), "-o", str(out)])
        return sass.parse_ptxas_log(done.stdout + done.stderr), out.read_bytes()


def cubin_sass(cubin: bytes) -> tuple[dict, dict]:
    """(instructions per function, {function: REG count from the cubin's resource usage})."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "k.cubin")
        path.write_bytes(cubin)
        text = run([tool("cuobjdump"), "-sass", str(path)]).stdout
        usage = run([tool("cuobjdump"), "-res-usage", str(path)]).stdout
    regs, shared, current = {}, {}, None
    for line in usage.splitlines():
        if m := re.match(r"\s*Function (\S+):", line):
            current = m.group(1)
        elif current and (m := re.search(r"REG:(\d+).*SHARED:(\d+)", line)):
            regs[current], shared[current] = int(m.group(1)), int(m.group(2))
    return sass.parse_sass(text), {"registers": regs, "shared": shared}


# ---------------------------------------------------------------- one kernel

def compile_triton(row):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel, signature, constexprs, divisible, num_warps = row.spec
    names = list(signature)
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in divisible}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", row.arch, 32),
                          options={"num_warps": num_warps, "num_stages": row.num_stages})


def per_element(loop, elements_per_thread_step, element_bytes, is_loop):
    """SASS instructions (and MUFU) per element of the steady state, and how many elements one trip covers."""
    if is_loop and loop.vector_load_bytes and loop.vector_load_bytes % (elements_per_thread_step * element_bytes) == 0:
        elements = loop.vector_load_bytes // element_bytes  # ptxas may unroll: count what the trip loads
    else:
        elements = elements_per_thread_step
    return loop.instructions / elements, loop.mufu / elements, elements


def analyse(name, arch, ptxas_fn, instructions, cubin_regs, shared, threads, element_bytes, hbm_bytes,
            elements_per_thread_step, loop_kernel):
    result = {
        "kernel": name, "arch": f"sm_{arch}", "threads": threads, "registers": ptxas_fn.registers,
        "cubin_registers": cubin_regs, "spill_store_bytes": ptxas_fn.spill_store_bytes,
        "spill_load_bytes": ptxas_fn.spill_load_bytes, "stack_bytes": ptxas_fn.stack_bytes,
        "spills": ptxas_fn.spills, "shared_bytes": shared, "sass_instructions": len(instructions),
    }
    try:
        # Every streaming loop of erpo computes one exponential per element it loads: the steady state too.
        loop = sass.steady_state_loop(instructions, 1 / element_bytes) if loop_kernel else None
    except ValueError as err:
        result["error"] = str(err)
        return result
    if loop_kernel and loop is None:
        result["error"] = "no loop found in the SASS of a kernel whose steady state is a loop"
        return result
    body = loop if loop is not None else sass.body_stats(instructions)
    per_elem, mufu_per_elem, elements = per_element(body, elements_per_thread_step, element_bytes, loop is not None)
    result.update({
        "loop_instructions": body.instructions, "loop_body_instructions": body.body_instructions,
        "loop_elements_per_thread": elements,
        "instructions_per_element": round(per_elem, 2), "mufu_per_element": round(mufu_per_elem, 3),
        "loop_opcodes": body.opcodes, "hbm_bytes_per_element": hbm_bytes,
    })
    occ = sass.occupancy(arch, ptxas_fn.registers, threads, shared)
    result["occupancy"] = occ
    in_flight = occ["blocks_per_sm"] * threads * body.load_bytes
    result["predicted"] = {
        gpu: sass.predict_bandwidth_fraction(gpu, per_elem, mufu_per_elem, hbm_bytes, in_flight)
        for gpu, spec in sass.GPUS.items() if spec["arch"] == arch
    }
    return result


def triton_result(row):
    compiled = compile_triton(row)
    arch_name = "sm_90a" if row.arch == 90 else f"sm_{row.arch}"  # Triton compiles sm_90 as sm_90a
    functions, _ = ptxas_report(compiled.asm["ptx"], arch_name)
    fn_name = compiled.metadata.name
    by_fn, usage = cubin_sass(compiled.asm["cubin"])
    threads = row.num_warps * 32
    result = analyse(row.name, row.arch, functions[fn_name], by_fn[fn_name], usage["registers"].get(fn_name),
                     compiled.metadata.shared, threads, row.element_bytes, row.hbm_bytes,
                     max(row.elements_per_step // threads, 1), row.loop)
    result.update({"dtype": row.dtype, "source": "triton", "num_warps": row.num_warps,
                   "constexprs": {k: v for k, v in row.spec[2].items()}})
    if result["cubin_registers"] != result["registers"]:
        result["error"] = f"ptxas -v says {result['registers']} registers, the cubin {result['cubin_registers']}"
    return result


def head_result(row, hidden=HEAD_HIDDEN_SIZE):
    """One fused-head kernel (a matmul tile kernel): registers, spills, occupancy, the tile's SASS and MMAs."""
    compiled = compile_triton(row)
    arch_name = "sm_90a" if row.arch == 90 else f"sm_{row.arch}"
    functions, _ = ptxas_report(compiled.asm["ptx"], arch_name)
    fn_name = compiled.metadata.name
    by_fn, usage = cubin_sass(compiled.asm["cubin"])
    ptxas_fn = functions[fn_name]
    threads = row.num_warps * 32
    block_n, block_v, block_h = row.tiles
    result = {
        "kernel": row.name, "arch": f"sm_{row.arch}", "dtype": row.dtype, "source": "triton", "kind": "matmul",
        "threads": threads, "num_warps": row.num_warps, "num_stages": row.num_stages,
        "tiles": {"BLOCK_N": block_n, "BLOCK_V": block_v, "BLOCK_H": block_h},
        "registers": ptxas_fn.registers, "cubin_registers": usage["registers"].get(fn_name),
        "spill_store_bytes": ptxas_fn.spill_store_bytes, "spill_load_bytes": ptxas_fn.spill_load_bytes,
        "stack_bytes": ptxas_fn.stack_bytes, "spills": ptxas_fn.spills, "shared_bytes": compiled.metadata.shared,
        "sass_instructions": len(by_fn[fn_name]), "hidden_size": hidden,
    }
    if result["cubin_registers"] != result["registers"]:
        result["error"] = f"ptxas -v says {result['registers']} registers, the cubin {result['cubin_registers']}"
        return result
    try:
        tiles = sass.matmul_tiles(by_fn[fn_name], row.dots)
    except ValueError as err:
        result["error"] = str(err)
        return result
    logits_per_thread = block_n * block_v / threads
    figures = sass.per_logit(tiles, hidden, block_h, logits_per_thread)
    tensor_cores = row.dtype != "fp32"
    result.update({
        "logits_per_thread_per_tile": logits_per_thread,
        "dot_loops": [sass.as_dict(d) for d in tiles.dot_loops],
        "tile_macs_per_trip": block_n * block_v * block_h,  # each dot loop's trip: one BLOCK_H slice of the tile
        "mma_macs_per_trip": [d.macs_per_thread * threads for d in tiles.dot_loops],
        "mma_per_trip_per_warp": [d.mma for d in tiles.dot_loops], "mma_opcodes": tiles.mma_opcodes,
        "mma_per_tile_per_warp": sum(d.mma for d in tiles.dot_loops) * -(-hidden // block_h),
        "outside_dot_instructions": tiles.outside_instructions,
        "instructions_per_logit": round(figures["sass"], 2), "epilogue_instructions_per_logit":
            round(figures["epilogue_sass"], 2), "dot_instructions_per_logit_per_trip": round(figures["dot_sass_per_trip"], 3),
        "mufu_per_logit": round(figures["mufu"], 3), "ffma_per_logit": round(figures["ffma"], 2),
        "flops_per_logit": row.flops_per_logit(hidden), "hbm_bytes_per_logit_no_reuse": row.hbm_bytes_per_logit(hidden),
        "occupancy": sass.occupancy(row.arch, ptxas_fn.registers, threads, compiled.metadata.shared),
    })
    result["predicted"] = {
        gpu: sass.predict_matmul(gpu, figures["sass"], figures["mufu"], figures["ffma"], row.flops_per_logit(hidden),
                                 tensor_cores, row.hbm_bytes_per_logit(hidden))
        for gpu, spec in sass.GPUS.items() if spec["arch"] == row.arch
    }
    return result


def cuda_results(rows, nvcc):
    """Compile each csrc file once per arch with -Xptxas -v and read every row's kernel from it."""
    results = []
    by_source = {}
    for row in rows:
        by_source.setdefault(row.source, []).append(row)
    for source, source_rows in by_source.items():
        for arch in ARCHS:
            with tempfile.TemporaryDirectory() as tmp:
                cubin = Path(tmp, "k.cubin")
                done = run([nvcc, "-cubin", *NVCC_FLAGS, f"-arch=sm_{arch}", "-Xptxas", "-v", f"-I{REPO / 'csrc'}",
                            str(REPO / "csrc" / source), "-o", str(cubin)])
                functions = sass.parse_ptxas_log(done.stdout + done.stderr)
                by_fn, usage = cubin_sass(cubin.read_bytes())
            for row in source_rows:
                name = f"{row.kernel}-sm{arch}-{row.dtype}"
                matches = [fn for fn in by_fn if re.search(row.symbol, fn)]
                if len(matches) != 1:
                    results.append({"kernel": name, "source": "cuda", "error": f"{row.symbol!r} matches {matches}"})
                    continue
                fn = matches[0]
                result = analyse(name, arch, functions[fn], by_fn[fn], usage["registers"].get(fn),
                                 usage["shared"].get(fn, 0), row.threads, row.element_bytes, row.hbm_bytes,
                                 row.elements_per_thread_step, True)
                result.update({"dtype": row.dtype, "source": "cuda", "function": fn})
                results.append(result)
    return results


# ---------------------------------------------------------------- report

def markdown(results, meta) -> str:
    lines = [
        "# erpo static kernel report (no GPU: compiled code read, bandwidth PREDICTED)",
        "",
        f"triton {meta['triton']}, ptxas `{meta['ptxas']}`, nvcc `{meta['nvcc']}`. Produced by `{meta.get('command', 'python -m bench.static')}`.",
        "Instructions per element: SASS instructions on the steady-state path of the streaming loop (the rebase",
        "taken when a block raises the row max is skipped; `loop_body_instructions` in the JSON counts it) /",
        "elements one thread consumes per trip. Predicted fraction: min over the issue bound (128 thread-instructions per clock per",
        f"SM), the MUFU bound (16 per clock per SM) and a Little's-law bound (assumed {sass.ASSUMED_DRAM_LATENCY_S * 1e9:.0f} ns",
        "loaded DRAM latency) of the HBM rate; clocks and bandwidths in bench/static_sass.py. **Predicted, not measured.**",
        "",
        "| kernel | regs | spills (st/ld B) | threads | occupancy (limit) | SASS/elem | MUFU/elem | loop instr / elems |"
        " predicted fraction of HBM BW (bound) |",
        "|---|---:|---:|---:|---|---:|---:|---:|---|",
    ]
    for r in results:
        if r.get("kind") == "matmul":
            continue
        if "error" in r:
            lines.append(f"| {r['kernel']} | ERROR: {r['error'].splitlines()[0][:120]} |||||||")
            continue
        occ = r["occupancy"]
        predicted = ", ".join(f"{gpu} {p['predicted_fraction']:.0%} ({p['predicted_bound']})"
                              for gpu, p in r["predicted"].items())
        lines.append(
            f"| {r['kernel']} | {r['registers']} | {r['spill_store_bytes']}/{r['spill_load_bytes']} | {r['threads']} | "
            f"{occ['occupancy']:.0%} ({occ['limited_by']}) | {r['instructions_per_element']} | "
            f"{r['mufu_per_element']} | {r['loop_instructions']} / {r['loop_elements_per_thread']} | {predicted} |")
    head = [r for r in results if r.get("kind") == "matmul"]
    if head:
        lines += head_markdown(head)
    spills = [r["kernel"] for r in results if r.get("spills")]
    errors = [r["kernel"] for r in results if "error" in r]
    lines += ["", f"Spilling kernels: {', '.join(spills) or 'none'}. Errors: {', '.join(errors) or 'none'}.", ""]
    return "\n".join(lines)


def head_markdown(results) -> list:
    hidden = results[0]["hidden_size"]
    lines = [
        "",
        f"## Fused LM head (matmul tiles; compute peak PREDICTED, at H = {hidden})",
        "",
        "Per logit of the recomputed [BLOCK_N, BLOCK_V] tile, per thread: (SASS of the tl.dot loops over H, one trip",
        f"per BLOCK_H slice, times ceil(H / BLOCK_H) trips + every other instruction of the tile loop) / logits one",
        "thread holds (BLOCK_N x BLOCK_V / threads); all instructions of each body, no path analysis. `epilogue`: the",
        "part outside the dot loops (softmax stats or dlogits, pipeline prologue), independent of H. MMA: HMMA (sm_80,",
        "per warp) or HGMMA (sm_90, per warpgroup, issued by each of its 4 warps) per tile at H and per dot-loop trip,",
        "per warp; their multiply-adds equal the tile's BLOCK_N x BLOCK_V x BLOCK_H per trip (checked in CI).",
        "Predicted fraction of the compute peak (dense tensor cores: A100 312, H100/H200 989 TFLOP/s; fp32 inputs",
        "run their \"ieee\" dots on the FP32 pipe: lanes x 2 x SMs x clock) = min(1, issue, MUFU, FP32-pipe rate",
        "over the peak rate). `HBM no reuse`: the HBM rate over the peak rate if every operand tile came from HBM",
        "(the worst case; L2 reuse is not modelled), not folded into the prediction. **Predicted, not measured.**",
        "The head's merge of split states (head-merge, first table) is a flat kernel: its element is a row (S = 1).",
        "",
        "| kernel | regs | spills (st/ld B) | threads | smem KiB | occupancy (limit) | tile N x V x H | MMA/tile/warp (per trip) |"
        " SASS/logit | epilogue SASS/logit | MUFU/logit | predicted fraction of compute peak (bound), HBM no reuse |",
        "|---|---:|---:|---:|---:|---|---|---:|---:|---:|---:|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['kernel']} | ERROR: {r['error'].splitlines()[0][:120]} |||||||||||")
            continue
        occ = r["occupancy"]
        t = r["tiles"]
        predicted = ", ".join(
            f"{gpu} {p['predicted_fraction_of_peak']:.0%} of {p['peak']} peak ({p['predicted_bound']}), "
            f"HBM no reuse {p['hbm_no_reuse_fraction_of_peak']:.0%}" for gpu, p in r["predicted"].items())
        mma = f"{r['mma_per_tile_per_warp']} ({' + '.join(str(n) for n in r['mma_per_trip_per_warp'])})"
        lines.append(
            f"| {r['kernel']} | {r['registers']} | {r['spill_store_bytes']}/{r['spill_load_bytes']} | {r['threads']} | "
            f"{r['shared_bytes'] / 1024:.0f} | {occ['occupancy']:.0%} ({occ['limited_by']}) | "
            f"{t['BLOCK_N']} x {t['BLOCK_V']} x {t['BLOCK_H']} | {mma} | {r['instructions_per_logit']} | "
            f"{r['epilogue_instructions_per_logit']} | {r['mufu_per_logit']} | {predicted} |")
    return lines


def spill_detector_control(row):
    """The detector must be able to fail: the same kernel's PTX capped at 32 registers (`.maxnreg 32`) makes
    ptxas spill for real; this returns what the detector reads from that log (it must report spills)."""
    compiled = compile_triton(row)
    arch_name = "sm_90a" if row.arch == 90 else f"sm_{row.arch}"
    capped, n = re.subn(r"^(\.reqntid [^\n]*)$", r"\1\n.maxnreg 32", compiled.asm["ptx"], count=1, flags=re.M)
    if not n:
        raise RuntimeError("no .reqntid directive in the PTX to attach .maxnreg to")
    functions, _ = ptxas_report(capped, arch_name)
    fn = functions[compiled.metadata.name]
    return {"kernel": f"control-{row.name}-maxnreg32", "source": "control", "registers": fn.registers,
            "spill_store_bytes": fn.spill_store_bytes, "spill_load_bytes": fn.spill_load_bytes,
            "detected_spills": fn.spills}


def collect(triton=True, cuda=True, only=None, configs=False, head=True):
    results = []
    if triton:
        rows = [*triton_rows(), *(head_merge_rows() if head else ()), *(autotune_rows() if configs else ())]
        for row in [*rows, *(head_rows() if head else ())]:
            if only and not re.search(only, row.name):
                continue
            try:
                results.append(head_result(row) if row.kernel in ("head-fwd", "head-dhidden", "head-dweight")
                               else triton_result(row))
            except Exception as err:  # reported per kernel: one broken kernel must not hide the others
                results.append({"kernel": row.name, "source": "triton", "error": f"{type(err).__name__}: {err}",
                                **({"kind": "matmul"} if hasattr(row, "dots") else {})})
    if cuda:
        nvcc = shutil.which("nvcc")
        if nvcc is None:
            results.append({"kernel": "cuda", "source": "cuda", "error": "nvcc not on PATH"})
        else:
            try:
                results.extend(cuda_results(list(cuda_rows()), nvcc))
            except Exception as err:
                results.append({"kernel": "cuda", "source": "cuda", "error": f"{type(err).__name__}: {err}"})
    return results


def failures(results, control) -> list:
    """What fails the report: a kernel that spills or did not compile, or a spill detector that saw nothing
    in the control built to spill."""
    bad = [r["kernel"] for r in results if r.get("spills") or "error" in r]
    if not control["detected_spills"]:
        bad.append(control["kernel"])
    return bad


def meta():
    import triton

    nvcc = shutil.which("nvcc")
    nvcc_version = run([nvcc, "--version"]).stdout.strip().splitlines()[-1] if nvcc else None
    return {"triton": triton.__version__, "ptxas": run([tool("ptxas"), "--version"]).stdout.strip().splitlines()[-1],
            "nvcc": nvcc_version, "gpus": sass.GPUS, "assumed_dram_latency_s": sass.ASSUMED_DRAM_LATENCY_S}


def main(argv=None) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":  # @triton.jit would make Python functions, not compilable ones
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.call([sys.executable, "-m", "bench.static", *(argv or sys.argv[1:])], env=env, cwd=REPO)
    p = argparse.ArgumentParser(prog="python -m bench.static", description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--no-cuda", action="store_true", help="Triton kernels only (skips the nvcc compiles)")
    p.add_argument("--only", default=None, help="regex on the Triton kernel names (implies --no-cuda), e.g. sm90-bf16")
    p.add_argument("--configs", action="store_true",
                   help="also every autotune candidate of the bf16 forward/backward (sm_90)")
    p.add_argument("--no-head", action="store_true", help="skip the fused LM head's kernels")
    args = p.parse_args(argv)
    results = collect(cuda=not (args.no_cuda or args.only), only=args.only, configs=args.configs,
                      head=not args.no_head)
    control = spill_detector_control(next(row for row in triton_rows() if row.name == "fwd-sm90-bf16"))
    info = meta()
    flags = [flag for flag, on in (("--no-cuda", args.no_cuda), ("--configs", args.configs), ("--no-head", args.no_head))
             if on] + ([f"--only {args.only}"] if args.only else [])
    info["command"] = " ".join(["python -m bench.static", *flags])
    table = markdown(results, info) + (
        f"Spill-detector control: {control['kernel']} -> {control['spill_store_bytes']} B spill stores, "
        f"{control['spill_load_bytes']} B spill loads read from ptxas -v "
        f"({'detected' if control['detected_spills'] else 'NOT DETECTED: the detector is broken'}).\n")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "static.json"), "w") as f:
        json.dump({"meta": info, "results": results, "spill_detector_control": control}, f, indent=1)
    with open(os.path.join(args.out, "static.md"), "w") as f:
        f.write(table)
    print(table)
    bad = failures(results, control)
    if bad:
        print(f"FAILED (spills, errors or a blind spill detector): {', '.join(bad)}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
