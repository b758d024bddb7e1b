"""The sweep driver: plans the (shape, case, kind, method, mode) items, runs them in worker processes and
derives bandwidth and ratios against naive from what the workers measured."""
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from datetime import datetime, timezone

import torch

from bench import cases, measure
from bench.inputs import Shape
from bench.worker import MARKER

# glibc returns freed blocks above this size to the OS at once, so a worker's resident set tracks its live
# tensors (the default threshold adapts upward and would keep freed chunks resident, hiding them from VmHWM).
WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
SEED = 1234
# Below this a peak is noise for a ratio: the CPU resident set moves in pages and allocator arenas.
MEMORY_RESOLUTION = {"cpu": 1 << 20, "cuda": 1}
# How close a case's checksums must be to naive's: fp32 sums of ~1e4 terms agree to ~1e-6 relative; bf16
# cases store bf16 gradients and differ in where they round (naive may compute in bf16), so allow 3e-2.
AGREEMENT_RTOL = {"float32": 1e-3, "bfloat16": 3e-2, "float16": 1e-2}


def plan(shapes, device: str, selected=None, kinds=("op", "loss"), preset_skip=None, loss_shapes=None) -> list:
    """Every item of the sweep, as dicts; items that cannot run here carry status "skipped" and a reason."""
    preset_skip = preset_skip or {}
    items = []
    for shape in shapes:
        for kind in kinds:
            if kind == "loss" and loss_shapes is not None and shape not in loss_shapes:
                continue
            for mode in cases.MODES[kind]:
                for method in cases.methods_of_kind(kind):
                    for case in cases.CASES:
                        if selected and case.name not in selected:
                            continue
                        if not case.runs(kind, mode) or method not in case.methods_of(kind):
                            continue
                        item = {"case": case.name, "kind": kind, "method": method, "mode": mode, "device": device,
                                **asdict(shape)}
                        reason = (preset_skip.get(f"{case.name}:{kind}") or preset_skip.get(case.name)
                                  or cases.skip_reason(case, device))
                        if reason:
                            item.update(status="skipped", reason=reason)
                        items.append(item)
    return items


def worker_groups(items: list, isolate: str) -> list:
    """Runnable items grouped per worker process: one item each, or all items of a shape together."""
    runnable = [it for it in items if "status" not in it]
    if isolate == "case":
        return [[it] for it in runnable]
    groups = {}
    for it in runnable:
        groups.setdefault((it["n_tokens"], it["vocab"], it["dtype"], it.get("hidden_size")), []).append(it)
    return list(groups.values())


def run_group(group: list, device: str, repeats: int, max_seconds: float, timeout_s: float, threads) -> list:
    first = group[0]
    spec = {
        "device": device, "n_tokens": first["n_tokens"], "vocab": first["vocab"], "dtype": first["dtype"],
        "hidden_size": first.get("hidden_size", 1024), "seed": SEED, "repeats": repeats, "max_seconds": max_seconds, "threads": threads,
        "items": [{k: it[k] for k in ("case", "kind", "method", "mode")} for it in group],
    }
    env = {**os.environ, **WORKER_ENV}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "bench.worker", json.dumps(spec)], capture_output=True, text=True,
            timeout=timeout_s, env=env, cwd=root,
        )
        stdout, rc, tail = proc.stdout, proc.returncode, proc.stderr.strip().splitlines()[-3:]
    except subprocess.TimeoutExpired as err:
        stdout, rc, tail = (err.stdout or b"").decode() if isinstance(err.stdout, bytes) else (err.stdout or ""), None, []
    done = {}
    for line in stdout.splitlines():
        if line.startswith(MARKER):
            res = json.loads(line[len(MARKER):])
            done[(res["case"], res["kind"], res["method"], res["mode"])] = res
    results = []
    for it in group:
        key = (it["case"], it["kind"], it["method"], it["mode"])
        if key in done:
            results.append({**it, **done[key]})
        elif rc is None:
            results.append({**it, "status": "error", "reason": f"worker timed out after {timeout_s:.0f} s"})
        elif rc == -signal.SIGKILL:
            results.append({**it, "status": "oom", "reason": "worker killed by SIGKILL (the out-of-memory killer)"})
        else:
            results.append({**it, "status": "error", "reason": f"worker exited with code {rc}: {' | '.join(tail)}"})
    return results


def minimal_bytes(result: dict) -> int:
    """Bytes the op cannot avoid moving: read the logits once forward; read them again and write the gradient
    once backward (per-row inputs and outputs are O(N) and left out). Linear kind: read hidden and weight
    twice and write their gradients once (matmul-bound: its GB/s column is only indicative)."""
    if result.get("kind") == "linear":
        shape = Shape(result["n_tokens"], result["vocab"], result["dtype"], result["hidden_size"])
        return 3 * (shape.n_tokens + shape.vocab) * shape.hidden_size * shape.element_bytes
    shape = Shape(result["n_tokens"], result["vocab"], result["dtype"])
    passes = 1 if result["mode"] == "fwd" else 3
    return passes * shape.n_tokens * shape.vocab * shape.element_bytes


def derive(results: list, peak_bandwidth: float) -> None:
    """Add bandwidth, fraction of peak, and time/memory ratios and checksum agreement against naive."""
    def key(r):
        return (r["kind"], r["method"], r["mode"], r["n_tokens"], r["vocab"], r["dtype"], r.get("hidden_size"))

    naive = {key(r): r for r in results if r["case"] == "naive"}
    for r in results:
        if r.get("status") != "ok":
            continue
        r["min_bytes"] = minimal_bytes(r)
        r["bandwidth_Bps"] = r["min_bytes"] / r["median_s"]
        r["bandwidth_fraction"] = r["bandwidth_Bps"] / peak_bandwidth
        base = naive.get(key(r))
        if base is None or r["case"] == "naive":
            continue
        if base.get("status") != "ok":
            r["vs_naive"] = f"naive {base.get('status')}"
            continue
        r["speedup_vs_naive"] = base["median_s"] / r["median_s"]
        if min(base["peak_extra_bytes"], r["peak_extra_bytes"]) >= MEMORY_RESOLUTION.get(r["device"], 0):
            r["memory_ratio_vs_naive"] = base["peak_extra_bytes"] / max(r["peak_extra_bytes"], 1)
        diffs = [abs(a - b) / max(abs(b), 1e-12) for a, b in zip(r["checksum"], base["checksum"])]
        r["checksum_rel_diff"] = max(diffs)
        r["agrees_with_naive"] = r["checksum_rel_diff"] <= AGREEMENT_RTOL.get(r["dtype"], 3e-2)


def row_key(r: dict) -> tuple:
    return (r["case"], r["kind"], r["method"], r["mode"], r["n_tokens"], r["vocab"], r["dtype"], r.get("hidden_size"))


def _pooled(old: dict, new: dict) -> dict:
    """One row from two runs of the same item: all timed samples together, the median of the runs' peaks."""
    if old.get("status") != "ok" or new.get("status") != "ok":
        return new if new.get("status") == "ok" or old.get("status") != "ok" else old
    peaks = old.get("peak_extra_bytes_runs", [old["peak_extra_bytes"]]) + [new["peak_extra_bytes"]]
    row = {**new, **measure.summarize(old["times_s"] + new["times_s"])}
    row.update(peak_extra_bytes=int(statistics.median(peaks)), peak_extra_bytes_runs=peaks,
               runs=old.get("runs", 1) + 1)
    return row


def merge(previous: dict, sweep: dict, pool: bool = False) -> dict:
    """Rows of `previous` (an earlier results.json of the same device) not re-measured in `sweep`, plus the
    rows of `sweep`, ratios re-derived; lets a long sweep run in pieces (e.g. one dtype per command).
    With `pool`, a row measured in both runs keeps both runs' samples (repeated sweeps on a busy machine)."""
    if previous["meta"]["device_name"] != sweep["meta"]["device_name"]:
        raise SystemExit(f"--merge: {previous['meta']['device_name']!r} results cannot be merged with "
                         f"{sweep['meta']['device_name']!r} ones; use another --out")
    old = {row_key(r): r for r in previous["results"]}
    fresh = {row_key(r) for r in sweep["results"]}
    rows = [r for r in previous["results"] if row_key(r) not in fresh]
    rows += [_pooled(old[row_key(r)], r) if pool and row_key(r) in old else r for r in sweep["results"]]
    for r in rows:
        for k in ("vs_naive", "speedup_vs_naive", "memory_ratio_vs_naive", "checksum_rel_diff", "agrees_with_naive"):
            r.pop(k, None)
    derive(rows, sweep["meta"]["peak_bandwidth_Bps"])
    _sort(rows)
    runs = previous["meta"].get("runs", [{k: v for k, v in previous["meta"].items() if k != "runs"}])
    meta = {**sweep["meta"], "runs": runs + [sweep["meta"]]}
    return {"meta": meta, "results": rows}


def _sort(results: list) -> None:
    order = {name: i for i, name in enumerate(cases.BY_NAME)}
    results.sort(key=lambda r: (("op", "loss", "linear").index(r["kind"]), r["method"] or "", r["mode"], r["dtype"], r["vocab"],
                                r["n_tokens"], order[r["case"]]))


def _git(*args) -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=root, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    commit = _git("rev-parse", "HEAD")
    meta = {
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else _cpu_model(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_total_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "git_commit": commit,
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no", "--", "erpo", "kernels", "bench")),
        "platform": platform.platform(),
    }
    if device == "cuda":
        meta["gpu_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
    return meta


def run_sweep(preset, device: str, selected=None, kinds=("op", "loss"), shapes=None, log=print) -> dict:
    """Run the preset's sweep (or `shapes`, which then also take the loss cases)."""
    loss_shapes = None if shapes else preset.loss_shapes
    # The linear kind runs on its own shapes (they carry H), or on the shapes given.
    linear_shapes = shapes or preset.linear_shapes or ()
    shapes = shapes or tuple(dict.fromkeys(preset.shapes + (preset.loss_shapes or ())))
    meta = environment(device)
    if preset.threads:
        torch.set_num_threads(preset.threads)  # the copy bandwidth is measured with the workers' thread count
    meta.update(preset=preset.name, repeats=preset.repeats, isolate=preset.isolate, seed=SEED,
                loadavg_start=os.getloadavg(), torch_threads=torch.get_num_threads())
    copy_start = measure.copy_bandwidth(device)
    items = plan(shapes, device, selected, tuple(k for k in kinds if k != "linear"), preset.skip, loss_shapes)
    if "linear" in kinds:
        items += plan(linear_shapes, device, selected, ("linear",), preset.skip)
    groups = worker_groups(items, preset.isolate)
    results = [it for it in items if "status" in it]
    started = time.perf_counter()
    for i, group in enumerate(groups, 1):
        first = group[0]
        label = f"N={first['n_tokens']} V={first['vocab']} {first['dtype']}"
        if preset.isolate == "case":
            label += f" {first['kind']}{'/' + first['method'] if first['method'] else ''} {first['mode']} {first['case']}"
        log(f"[{i}/{len(groups)}] {label} ({time.perf_counter() - started:.0f} s)")
        results.extend(run_group(group, device, preset.repeats, preset.max_seconds, preset.timeout_s, preset.threads))
    copy_end = measure.copy_bandwidth(device)
    peak, source = measure.device_peak_bandwidth(device, max(copy_start, copy_end))
    meta.update(
        copy_bandwidth_Bps={"start": copy_start, "end": copy_end}, peak_bandwidth_Bps=peak,
        peak_bandwidth_source=source, loadavg_end=os.getloadavg(), sweep_seconds=time.perf_counter() - started,
    )
    derive(results, peak)
    _sort(results)
    return {"meta": meta, "results": results}
