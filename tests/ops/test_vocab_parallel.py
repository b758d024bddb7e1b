"""Vocabulary-parallel ops and losses (process_group=) on 2 and 3 gloo processes against one process.

Each world size launches its ranks once (tests/ops/vocab_parallel_worker.py, subprocesses with a timeout);
every rank compares its sharded result with the single-process one on the whole vocabulary and records the
relative errors; the tests below assert on every rank's records, one test per case. Shards are uneven
(2 ranks: 15 + 22 ids, 3 ranks: 5 + 20 + 12 of V = 37), rows include ignore_index, temperatures != 1.
"""
import json
import os
import subprocess
import sys

import pytest

from erpo.losses.config import METHODS

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORLDS = (2, 3)
TIMEOUT_S = 900


def launch(world: int, tmp) -> list:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    store = os.path.join(tmp, "store")
    code = ("import sys; from tests.ops.vocab_parallel_worker import main; "
            "main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(rank), str(world), store, str(tmp)], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in range(world)]
    logs = []
    for proc in procs:
        try:
            logs.append(proc.communicate(timeout=TIMEOUT_S)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
    for rank, (proc, log) in enumerate(zip(procs, logs)):
        assert proc.returncode == 0, f"rank {rank} of {world} failed:\n{log[-4000:]}"
    records = []
    for rank in range(world):
        with open(os.path.join(tmp, f"rank{rank}.json")) as f:
            records.append(json.load(f))
    return records


@pytest.fixture(scope="module", params=WORLDS, ids=lambda w: f"world{w}")
def ranks(request, tmp_path_factory):
    return launch(request.param, tmp_path_factory.mktemp(f"world{request.param}"))


def case(ranks, name) -> list:
    out = []
    for rank, records in enumerate(ranks):
        record = records[name]
        assert "exception" not in record, f"rank {rank}: {record.get('exception')}"
        out.append(record)
    return out


def assert_close(records, tolerances: dict) -> None:
    for rank, record in enumerate(records):
        for key, tol in tolerances.items():
            assert record[key] < tol, f"rank {rank}: {key} relative error {record[key]:.3g} >= {tol}"
        for key, value in record.items():
            if key.endswith("nonzero"):
                assert value == 1.0, f"rank {rank}: {key} is all zero (the test would pass on a dead gradient)"


def test_logits_op_float64_torch(ranks):
    assert_close(case(ranks, "logits_f64_torch"),
                 dict(logp=1e-12, entropy=1e-12, grad_logits=1e-12, nograd_logp=1e-12, nograd_entropy=1e-12))


def test_logits_op_float32_torch(ranks):
    assert_close(case(ranks, "logits_f32_torch"),
                 dict(logp=1e-5, entropy=1e-5, grad_logits=1e-5, nograd_logp=1e-5, nograd_entropy=1e-5))


def test_logits_op_inplace_grad(ranks):
    assert_close(case(ranks, "logits_f32_torch_inplace"),
                 dict(logp=1e-5, entropy=1e-5, grad_logits=1e-5, nograd_logp=1e-5, nograd_entropy=1e-5))


def test_logits_op_triton_interpreter(ranks):
    assert_close(case(ranks, "logits_f32_triton"),
                 dict(logp=1e-5, entropy=1e-5, grad_logits=1e-5, nograd_logp=1e-5, nograd_entropy=1e-5))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_linear_op(ranks, backend):
    assert_close(case(ranks, f"linear_{backend}"),
                 dict(logp=1e-5, entropy=1e-5, grad_hidden=1e-5, grad_weight=1e-5, grad_bias=1e-5))


@pytest.mark.parametrize("method", METHODS)
def test_policy_loss_every_method(ranks, method):
    assert_close(case(ranks, f"policy_loss_{method}"), dict(loss=1e-10, grad_logits=1e-10, metrics=1e-9))


@pytest.mark.parametrize("method", METHODS)
def test_linear_policy_loss_every_method(ranks, method):
    records = case(ranks, f"linear_policy_loss_{method}")
    assert_close(records, dict(loss=1e-5, grad_hidden=1e-4, grad_weight=1e-4, grad_bias=1e-4, metrics=1e-4))
    assert all(r["same_metric_names"] == 1.0 for r in records)


def test_linear_policy_loss_triton_head(ranks):
    assert_close(case(ranks, "linear_policy_loss_dapo_triton"),
                 dict(loss=1e-5, grad_hidden=1e-4, grad_weight=1e-4, grad_bias=1e-4, metrics=1e-4))


@pytest.mark.parametrize("name, message", [
    ("vocab_size", "ValueError: the vocabulary shards of the process group add up to 37 ids, not vocab_size=38"),
    ("linear_vocab_size", "ValueError: the vocabulary shards of the process group add up to 37 ids, not vocab_size=36"),
    ("target_range", "ValueError: target id 37 at flat position 2 is out of range [0, 37)"),
    ("not_a_group", "TypeError: process_group must be a torch.distributed.ProcessGroup"),
    ("one_pass", "ValueError: schedule='one_pass' cannot run on a vocabulary-sharded head"),
    ("batch_target_range", "ValueError: batch['targets'] has an id outside [0, 37) where mask is 1"),
])
def test_errors(ranks, name, message):
    for rank, records in enumerate(ranks):
        assert records["errors"][name].startswith(message), f"rank {rank}: {records['errors'][name]}"
        assert "\n" not in records["errors"][name]


def test_unchecked_id_outside_the_vocabulary_gives_nan(ranks):
    assert all(records["errors"]["unchecked_out_of_range_logp_is_nan"] == "True" for records in ranks)


def test_one_collective_per_forward_none_in_the_logits_backward(ranks):
    # The logits path's backward needs only the merged lse and entropy; the fused head's all-reduces grad_hidden.
    for record in case(ranks, "collectives"):
        assert record == dict(logits_forward=1, logits_backward=0, linear_forward=1, linear_backward=1)
