"""The GPU sweep cannot run here, so its plan, its ratios against naive and the writers are tested on
synthetic sweeps: the case table for a CUDA device, OOM and skipped rows, and the one-command GPU entry."""
import json
import os
import subprocess
import sys

import pytest
import torch

from bench import cases, report, runner
from bench.presets import PRESETS

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_gpu_plan_covers_the_issue_sweep():
    preset = PRESETS["gpu"]
    shapes = {(s.n_tokens, s.vocab, s.dtype) for s in preset.shapes}
    assert shapes == {(n, v, d) for n in (1024, 4096, 16384, 32768) for v in (32000, 128256, 151936)
                      for d in ("bfloat16", "float32")}
    items = runner.plan(preset.shapes, "cuda", preset_skip=preset.skip)
    planned = {(it["case"], it["kind"], it["method"], it["mode"]) for it in items if it["n_tokens"] == 16384
               and it["vocab"] == 151936 and it["dtype"] == "bfloat16"}
    for case in ("naive", "naive-compiled", "erpo-torch", "erpo-triton"):
        assert (case, "op", None, "fwd") in planned and (case, "op", None, "fwdbwd") in planned
    assert ("erpo-triton-inplace", "op", None, "fwdbwd") in planned
    assert ("erpo-triton-inplace", "op", None, "fwd") not in planned  # an in-place grad has no forward-only run
    assert ("liger", "loss", "grpo", "fwdbwd") in planned and ("liger", "loss", "erpo", "fwdbwd") not in planned
    for method in cases.LOSS_METHODS:
        assert ("naive", "loss", method, "fwdbwd") in planned and ("erpo", "loss", method, "fwdbwd") in planned
    # Triton cases are not skipped for want of a GPU on a CUDA plan; the CUDA extension may be (not built here).
    triton = [it for it in items if it["case"] == "erpo-triton"]
    assert triton and all("status" not in it for it in triton)
    groups = runner.worker_groups(items, preset.isolate)
    assert len(groups) == len(preset.shapes)  # one worker per shape: OOM and crashes stay in their shape


def test_cpu_plan_skips_gpu_cases_with_reason():
    preset = PRESETS["cpu"]
    items = runner.plan(preset.shapes, "cpu", preset_skip=preset.skip, loss_shapes=preset.loss_shapes)
    skipped = {it["case"]: it["reason"] for it in items if it.get("status") == "skipped"}
    assert skipped["erpo-triton"] == "needs a CUDA GPU"
    assert "naive-compiled" not in skipped or skipped["naive-compiled"]  # op runs; the loss one is skipped
    assert all(it["kind"] == "op" for it in items if it["case"] == "naive-compiled" and "status" not in it)
    assert {(it["n_tokens"], it["dtype"]) for it in items if it["kind"] == "loss"} == {(1024, "float32"), (4096, "float32")}
    assert len(runner.worker_groups(items, "case")) == sum("status" not in it for it in items)


def _row(case, median, peak, status="ok", kind="op", mode="fwdbwd", n=1024, **extra):
    row = {"case": case, "kind": kind, "method": None if kind == "op" else "grpo", "mode": mode, "device": "cuda",
           "n_tokens": n, "vocab": 32000, "dtype": "bfloat16", "status": status}
    if status == "ok":
        row.update(median_s=median, p25_s=median * 0.9, p75_s=median * 1.1, times_s=[median], peak_extra_bytes=peak,
                   checksum=extra.pop("checksum", [1.0, 2.0]), memory_method="max_memory_allocated")
    else:
        row["reason"] = "CUDA out of memory" if status == "oom" else "needs a CUDA GPU"
    row.update(extra)
    return row


def _sweep(results):
    meta = {"device": "cuda", "device_name": "NVIDIA H100 80GB HBM3", "cpu_count": 16, "torch_threads": 16,
            "torch": "2.x", "triton": "3.x", "cuda": "12.x", "git_commit": "0123456789abcdef", "git_dirty": False,
            "date_utc": "2026-01-01T00:00:00Z", "preset": "gpu", "peak_bandwidth_Bps": 3.35e12,
            "peak_bandwidth_source": "datasheet", "loadavg_start": [0.1], "loadavg_end": [0.2]}
    return {"meta": meta, "results": results}


def test_ratios_against_naive_and_oom():
    results = [
        _row("naive", 0.010, 3 << 30), _row("erpo-triton", 0.002, 1 << 20),
        _row("erpo-triton", 0.001, 1 << 20, checksum=[1.5, 2.0], n=2048), _row("naive", 0.004, 1 << 30, n=2048),
        _row("naive", None, None, status="oom", n=4096), _row("erpo-triton", 0.004, 1 << 21, n=4096),
    ]
    runner.derive(results, peak_bandwidth=3.35e12)
    fast, differs, after_oom = results[1], results[2], results[5]
    assert fast["speedup_vs_naive"] == pytest.approx(5.0) and fast["memory_ratio_vs_naive"] == pytest.approx(3072)
    assert fast["min_bytes"] == 3 * 1024 * 32000 * 2 and fast["bandwidth_fraction"] == pytest.approx(
        fast["min_bytes"] / 0.002 / 3.35e12)
    assert fast["agrees_with_naive"] and not differs["agrees_with_naive"]
    assert after_oom["vs_naive"] == "naive oom" and "speedup_vs_naive" not in after_oom


def test_writers_handle_oom_and_skips(tmp_path):
    results = [
        _row("naive", 0.010, 3 << 30), _row("erpo-triton", 0.002, 1 << 20), _row("naive", None, None, status="oom", n=4096),
        _row("erpo-triton", 0.008, 1 << 22, n=4096), _row("erpo-cuda", None, None, status="skipped"),
        _row("naive", 0.02, 3 << 30, kind="loss"), _row("erpo", 0.004, 1 << 20, kind="loss"),
    ]
    sweep = _sweep(results)
    runner.derive(results, peak_bandwidth=3.35e12)
    table = report.markdown(sweep)
    assert "| bfloat16 | 4096 | 32000 | naive | OOM |" in table and "naive oom" in table
    assert "| bfloat16 | 1024 | 32000 | erpo-triton | 2.00 |" in table and "| 5.00 |" in table
    report.write_json(sweep, str(tmp_path / "results.json"))
    assert json.loads((tmp_path / "results.json").read_text())["results"][2]["status"] == "oom"
    for path in report.plots(sweep, str(tmp_path)):
        assert os.path.getsize(path) > 10_000


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the GPU preset would run")
def test_gpu_preset_refuses_cpu_with_a_clear_message():
    proc = subprocess.run([sys.executable, "-m", "bench", "--preset", "gpu"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0 and "needs a CUDA GPU" in proc.stderr


def test_merge_replaces_remeasured_rows_and_rederives():
    first = _sweep([_row("naive", 0.010, 3 << 30), _row("erpo-triton", 0.005, 1 << 20)])
    runner.derive(first["results"], 3.35e12)
    second = _sweep([_row("erpo-triton", 0.002, 1 << 20), _row("naive", 0.008, 1 << 30, n=4096)])
    runner.derive(second["results"], 3.35e12)
    merged = runner.merge(json.loads(json.dumps(first)), second)
    rows = {(r["case"], r["n_tokens"]): r for r in merged["results"]}
    assert len(merged["results"]) == 3
    assert rows[("erpo-triton", 1024)]["speedup_vs_naive"] == pytest.approx(5.0)  # new time, old naive
    assert len(merged["meta"]["runs"]) == 2
    other = _sweep([])
    other["meta"]["device_name"] = "NVIDIA H200"
    with pytest.raises(SystemExit, match="cannot be merged"):
        runner.merge(first, other)


def test_pool_keeps_the_samples_of_both_runs():
    first = _sweep([_row("naive", 0.010, 3 << 30), _row("erpo-triton", 0.004, 1 << 20)])
    second = _sweep([_row("naive", 0.012, 3 << 30), _row("erpo-triton", 0.002, 3 << 20)])
    pooled = runner.merge(first, second, pool=True)
    rows = {r["case"]: r for r in pooled["results"]}
    assert sorted(rows["erpo-triton"]["times_s"]) == [0.002, 0.004] and rows["erpo-triton"]["runs"] == 2
    assert rows["erpo-triton"]["median_s"] == pytest.approx(0.003)
    assert rows["erpo-triton"]["peak_extra_bytes_runs"] == [1 << 20, 3 << 20]
    assert rows["erpo-triton"]["speedup_vs_naive"] == pytest.approx(0.011 / 0.003)
