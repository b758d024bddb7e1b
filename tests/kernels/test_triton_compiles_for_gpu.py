"""Every Triton kernel compiles for real GPUs (sm_80, sm_90) on this GPU-less machine, as planned.

The interpreter runs kernels as Python, so it cannot catch what only the compiler sees (a loop-carried value
changing type, an unsupported construct, register spills). Triton compiles to PTX and cubin without a driver,
given a target; bench/compile_for_gpu.py does it in a process without TRITON_INTERPRET. The PTX is then
checked for the memory-bound plan: 16-byte vector loads of the logits, 16-byte vector stores of the gradient,
and no register spills as `ptxas -v` reports them (spills are ptxas's doing: the PTX cannot show them; that
the detector sees a real spill is tested in tests/kernels/test_static_report.py). On a machine with a GPU the kernels themselves run in tests/ops and tests/losses instead.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.compile_for_gpu import cases, head_cases

REPO = Path(__file__).resolve().parents[2]
CASES = [name for name, _, _ in cases()]
HEAD_CASES = [name for name, _, _ in head_cases()]
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # bytes one block may use on A100 / H100

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs the kernels themselves")


@pytest.fixture(scope="module")
def report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "bench.compile_for_gpu"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.parametrize("case", CASES)
def test_kernel_compiles_to_the_plan(report, case):
    result = report[case]
    assert "error" not in result, result.get("error")
    assert result["cubin"], "ptxas produced no cubin"
    # the split forward's merge reads a few (m, d, w) triples per row; replay gathers K scattered logits
    if not case.startswith(("merge", "replay")):
        assert result["vector_load"], "no 16-byte vector load in the PTX"
    if not case.startswith(("fwd", "partial", "merge", "replay")):  # those store per row (or scatter); others stream
        assert result["vector_store"], "no 16-byte vector store in the PTX"
    assert result["registers"] > 0, "ptxas -v reported no register count"
    assert result["spill_bytes"] == 0, f"ptxas spills {result['spill_bytes']} bytes ({result['registers']} registers)"


@pytest.mark.parametrize("case", HEAD_CASES)
def test_head_kernel_compiles_to_the_plan(report, case):
    """The fused LM head (tile matmuls): tensor cores for 16-bit heads, never tf32 for fp32 ones, shared
    memory within the architecture's limit, and no spills at the GPU tiles of any dtype."""
    result = report[case]
    assert "error" not in result, result.get("error")
    assert result["cubin"], "ptxas produced no cubin"
    assert result["registers"] is not None, "ptxas -v reported no register count"
    assert result["shared_bytes"] <= SHARED_MEMORY_LIMIT[int(case.split("-sm")[1][:2])], "shared memory"
    if "-merge" in case:  # [N]-sized merge of the vocabulary splits: no matmul
        assert result["spill_stores"] == 0
    elif "-fp32" in case:
        assert not result["tf32_mma"], "an fp32 head must multiply in full precision"
        assert result["spill_stores"] == 0 and not result["local_memory"], "register spills"
    else:
        assert result["tensor_core_mma"], "the tile matmul does not use tensor cores"
        assert result["spill_stores"] == 0 and not result["local_memory"], "register spills"
