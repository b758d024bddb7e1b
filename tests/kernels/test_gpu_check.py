"""bench/gpu_check.sh cannot run without a GPU: its shell is syntax-checked and its Python pieces
(bench/gpu_compare.py) run here on synthetic sweeps and static reports."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench import gpu_compare

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "gpu_check.sh"


def test_script_is_valid_bash():
    done = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_script_passes_shellcheck():
    done = subprocess.run(["shellcheck", "-S", "warning", str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


def test_every_python_module_the_script_calls_exists():
    text = SCRIPT.read_text()
    for module in ("bench.static", "bench.gpu_compare", "bench"):
        assert f"python -m {module} " in text
    for path in ("tests/ops", "tests/losses", "tests/csrc", "tests/kernels", "tests/kernels/test_static_report.py"):
        assert (REPO / path).exists(), path


def static_report(fwd, bwd, gpu="H100-SXM5"):
    def row(kernel, fraction):
        return {"kernel": kernel, "predicted": {gpu: {"predicted_fraction": fraction, "predicted_bound": "issue"}}}
    # The fused head's rows predict a fraction of compute peak (other keys): the comparison must skip them.
    head = {"kernel": "head-fwd-sm90-bf16", "kind": "matmul",
            "predicted": {gpu: {"predicted_fraction_of_peak": 1.0, "predicted_bound": "peak"}}}
    return {"results": [row("fwd-sm90-bf16", fwd), row("bwd-sm90-bf16", bwd),
                        row("cuda-fwd-sm90-bf16", fwd / 2), row("cuda-bwd-sm90-bf16", bwd / 2), head]}


def sweep_row(case, mode, n, fraction, median_s=1e-3):
    return {"case": case, "kind": "op", "mode": mode, "dtype": "bfloat16", "vocab": 151936, "n_tokens": n,
            "status": "ok", "median_s": median_s, "bandwidth_fraction": fraction}


def sweep(*rows, device="NVIDIA H100 80GB HBM3"):
    return {"meta": {"device_name": device, "torch": "2.11", "triton": "3.6", "date_utc": "x"}, "results": list(rows)}


def test_predicted_mixes_forward_and_backward_by_bytes():
    table, off = gpu_compare.predicted_table(
        sweep(sweep_row("erpo-triton", "fwd", 16384, 0.8), sweep_row("erpo-triton", "fwdbwd", 16384, 0.9)),
        static_report(0.8, 1.0))
    assert off == []
    # forward+backward: 3 / (1/0.8 + 2/1.0) = 0.923
    assert "| erpo-triton | fwdbwd | bfloat16 | 151936 | 16384 | 90% | 92% | 0.97 |" in table
    assert "| erpo-triton | fwd | bfloat16 | 151936 | 16384 | 80% | 80% | 1.00 |" in table


def test_predicted_flags_a_large_gap_only_at_large_n():
    rows = (sweep_row("erpo-triton", "fwd", 16384, 0.3), sweep_row("erpo-triton", "fwd", 1024, 0.1),
            sweep_row("erpo-cuda", "fwd", 16384, 0.4))
    table, off = gpu_compare.predicted_table(sweep(*rows), static_report(0.9, 0.9))
    assert [(r["case"], r["n_tokens"]) for r in off] == [("erpo-triton", 16384)]  # cuda: 0.4 of 0.45 is fine
    assert "**OFF**" in table and "small N: not judged" in table


def test_unknown_gpu_has_no_prediction_and_flags_nothing():
    table, off = gpu_compare.predicted_table(sweep(sweep_row("erpo-triton", "fwd", 16384, 0.1), device="RTX 4090"),
                                             static_report(0.9, 0.9))
    assert off == [] and "no prediction" in table


def test_cuda_vs_triton_target():
    def pair(cuda_ms, triton_ms):
        return [sweep_row(c, "fwdbwd", 4096, 0.5, t * 1e-3) for c, t in (
            ("erpo-cuda", cuda_ms), ("erpo-triton", triton_ms), ("erpo-cuda-inplace", cuda_ms),
            ("erpo-triton-inplace", triton_ms))]
    assert gpu_compare.cuda_table(sweep(*pair(1.05, 1.0)))[1]
    assert not gpu_compare.cuda_table(sweep(*pair(1.2, 1.0)))[1]
    assert not gpu_compare.cuda_table(sweep(*pair(1.0, 1.0)[:2]))[1]  # in-place pair missing


def test_command_line(tmp_path):
    results, static = tmp_path / "results.json", tmp_path / "static.json"
    results.write_text(json.dumps(sweep(sweep_row("erpo-triton", "fwd", 16384, 0.3))))
    static.write_text(json.dumps(static_report(0.9, 0.9)))
    done = subprocess.run([sys.executable, "-m", "bench.gpu_compare", "predicted", str(results), str(static)],
                          cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 1 and "**OFF**" in done.stdout
