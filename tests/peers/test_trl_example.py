"""examples/trl_grpo.py as the README describes it: it trains 5 steps by default on the CPU, and without TRL it
says in one line how to install it instead of a traceback (issue 25)."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "trl_grpo.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def test_example_trains_five_steps_by_default(trl_grpo):
    result = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=600, env=ENV,
                            cwd=ROOT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    steps = [line.split(":")[0] for line in result.stdout.splitlines() if line.startswith("step ")]
    assert steps == [f"step {i}" for i in range(1, 6)], result.stdout[-2000:]


def test_example_without_trl_names_the_install_command():
    """TRL made unimportable (None in sys.modules) before the example runs: one line naming the extra, status 1."""
    hide_trl = ("import runpy, sys; sys.modules['trl'] = None; sys.argv = [sys.argv[1]]; "
                "runpy.run_path(sys.argv[0], run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", hide_trl, str(EXAMPLE)], capture_output=True, text=True,
                            timeout=300, env=ENV, cwd=ROOT)
    assert result.returncode == 1
    assert result.stdout == "" and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "'trl'" in lines[0] and 'pip install -e ".[train,peers]"' in lines[0]
