"""pytest-benchmark view of the same cases as `python -m bench`: one shape per device, every case that can
run here, timed by pytest-benchmark (fresh logits per round, built outside the timer).

    pytest bench/ --benchmark-only                  # add --benchmark-json=out.json to keep the figures

Each benchmark's extra_info carries the minimal bytes and the achieved GB/s of its median. Peak memory and
the sweeps over N and V are `python -m bench`'s job (a fresh process per case), not this suite's.
"""
import pytest
import torch

from bench import cases, measure
from bench.inputs import Inputs, Shape
from bench.runner import minimal_bytes
from bench.worker import CaseRun

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# CPU: small enough for seconds per case on two cores; GPU: the headline shape.
SHAPE = Shape(16384, 151936, "bfloat16") if DEVICE == "cuda" else Shape(512, 32000, "float32")
ROUNDS = 20 if DEVICE == "cuda" else 5


def _params():
    params = []
    for case in cases.CASES:
        for kind in case.kinds:
            for mode in cases.MODES[kind]:
                for method in case.methods_of(kind):
                    if not case.runs(kind, mode):
                        continue
                    label = f"{kind}-{method or 'logprobs_entropy'}-{mode}-{case.name}"
                    reason = cases.skip_reason(case, DEVICE)
                    if case.name == "naive-compiled" and DEVICE == "cpu":
                        reason = reason or "torch.compile takes ~25 s per graph on CPU; see python -m bench"
                    marks = [pytest.mark.skip(reason=reason)] if reason else []
                    params.append(pytest.param(case.name, kind, method, mode, id=label, marks=marks))
    return params


@pytest.fixture(scope="module")
def inputs():
    return Inputs(SHAPE, DEVICE, seed=1234)


@pytest.mark.parametrize("case,kind,method,mode", _params())
def test_case(benchmark, inputs, case, kind, method, mode):
    run = CaseRun({"case": case, "kind": kind, "method": method, "mode": mode}, inputs)
    run(run.fresh_logits())  # warm-up (compiles) outside the rounds

    def setup():
        logits = run.fresh_logits()
        measure.flush_cache(DEVICE)
        return (logits,), {}

    def target(logits):
        out = run(logits)
        measure.synchronize(DEVICE)
        return out

    out = benchmark.pedantic(target, setup=setup, rounds=ROUNDS, iterations=1)
    assert all(torch.isfinite(torch.tensor(run.checksum(out)))), "non-finite output"
    nbytes = minimal_bytes({"mode": mode, "kind": kind, **SHAPE.__dict__})
    benchmark.extra_info.update(
        device=DEVICE, n_tokens=SHAPE.n_tokens, vocab=SHAPE.vocab, dtype=SHAPE.dtype, min_bytes=nbytes,
        GBps_at_median=nbytes / benchmark.stats.stats.median / 1e9,
    )
