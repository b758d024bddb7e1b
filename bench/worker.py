"""One worker process: runs a list of cases on one shape and prints one `BENCH_RESULT {json}` line per case.

Usage (the runner does this): python -m bench.worker '<json spec>'. Each case: a warm-up call (which also
compiles), one call measured for peak extra memory, then timed calls on fresh logits. A case's failure is
caught and reported in its own result; out-of-memory is reported as status "oom".
"""
import gc
import json
import os
import sys
import time
import traceback

import torch

if not torch.cuda.is_available():
    # The erpo package imports its Triton kernels; on a CPU-only machine they need the interpreter to import.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bench import cases, measure  # noqa: E402
from bench.inputs import Inputs, Shape  # noqa: E402

MARKER = "BENCH_RESULT "
CHECKSUM_ROWS = 1024


def _norm_sq(tensor: torch.Tensor) -> float:
    """Sum of squares in float64, a chunk of rows at a time (no full-size float64 copy)."""
    flat = tensor.detach().reshape(-1, tensor.shape[-1])
    return float(sum(c.double().square().sum() for c in flat.split(CHECKSUM_ROWS)))


class CaseRun:
    """Builds the call of one (case, kind, method, mode) and the fresh inputs it consumes."""

    def __init__(self, item: dict, inputs: Inputs):
        self.case = cases.BY_NAME[item["case"]]
        self.kind, self.method, self.mode = item["kind"], item.get("method"), item["mode"]
        self.inputs = inputs
        shape = inputs.shape
        if self.kind == "op":
            self.fn = cases.build_op(self.case.name)
        elif self.kind == "linear":
            self.fn = cases.build_linear(self.case.name, self.method, inputs.linear_batch())
        else:
            self.fn = cases.build_loss(self.case.name, self.method, inputs.batch())
            self.loss_shape = (shape.sequences, shape.n_tokens // shape.sequences, shape.vocab)

    def fresh_logits(self) -> torch.Tensor:
        """The input that changes per call: the logits, or the hidden states of the linear kind."""
        if self.kind == "linear":
            return self.inputs.hidden()
        backward = self.mode == "fwdbwd"
        return self.inputs.logits(requires_grad=backward, nonleaf=backward and self.case.inplace)

    def __call__(self, logits: torch.Tensor):
        """Run the case; return what the checksum reads (kept alive until the peak is taken)."""
        if self.mode == "fwd":
            with torch.no_grad():
                return self.fn(logits, self.inputs.targets)
        if self.kind == "linear":  # the gradients of the hidden states and of the head, both counted
            objective = self.fn(logits, self.inputs.weight())
            grads = torch.autograd.grad(objective, (logits, self.inputs.weight()))
            return objective.detach(), grads
        if self.kind == "op":
            logp, entropy = self.fn(logits, self.inputs.targets)
            objective = (logp * self.inputs.grad_logp).sum() + (entropy * self.inputs.grad_entropy).sum()
        else:
            objective = self.fn(logits.view(self.loss_shape))
        (grad,) = torch.autograd.grad(objective, logits)
        return objective.detach(), grad

    def checksum(self, out) -> list:
        """Numbers every case of a kind/mode must agree on (the runner compares them with naive)."""
        if self.mode == "fwd":
            return [float(out[0].double().sum()), float(out[1].double().sum())]
        objective, grad = out
        if self.kind == "linear":
            return [float(objective)] + [_norm_sq(g) for g in grad]
        return [float(objective), _norm_sq(grad)]


def run_case(item: dict, inputs: Inputs, device: str, repeats: int, max_seconds: float) -> dict:
    run = CaseRun(item, inputs)
    start = time.perf_counter()
    out = run(run.fresh_logits())  # warm-up: compiles, loads kernels, touches allocator paths
    measure.synchronize(device)
    warmup_s = time.perf_counter() - start
    del out
    gc.collect()

    logits = run.fresh_logits()
    with measure.PeakMemory(device) as memory:
        out = run(logits)
    checksum = run.checksum(out)
    del out, logits
    gc.collect()

    times = []
    deadline = time.perf_counter() + max_seconds
    while len(times) < repeats and (len(times) < 3 or time.perf_counter() < deadline):
        logits = run.fresh_logits()
        measure.flush_cache(device)
        times.append(measure.time_call(device, lambda: run(logits)))
        del logits
    return {
        "status": "ok", "warmup_s": warmup_s, "peak_extra_bytes": memory.extra_bytes,
        "baseline_bytes": memory.baseline_bytes, "memory_method": memory.method, "checksum": checksum,
        "loadavg_after": os.getloadavg()[0], **measure.summarize(times),
    }


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, (torch.cuda.OutOfMemoryError, MemoryError)) or "out of memory" in str(err).lower()


def main(spec: dict) -> None:
    device = spec["device"]
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    shape = Shape(spec["n_tokens"], spec["vocab"], spec["dtype"], spec.get("hidden_size", 1024))
    inputs = Inputs(shape, device, spec["seed"])
    for item in spec["items"]:
        result = dict(item)
        try:
            result.update(run_case(item, inputs, device, spec["repeats"], spec["max_seconds"]))
        except Exception as err:  # every failure is a reported result, never the end of the sweep
            message = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
            if _is_oom(err):
                result.update(status="oom", reason=message)
            elif cases.BY_NAME[item["case"]].optional:
                result.update(status="skipped", reason=f"failed here: {message}")
            else:
                result.update(status="error", reason=message, traceback=traceback.format_exc(limit=6))
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        print(MARKER + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
