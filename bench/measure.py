"""How each figure is measured: wall time, peak extra memory, and the device's bandwidth ceiling.

CPU memory: the process's peak resident set (VmHWM) is reset through /proc/self/clear_refs right before the
measured call and read right after, minus the resident set just before it. The worker runs with glibc's mmap
threshold pinned low (see runner.WORKER_ENV), so freed tensors go back to the OS at once and the resident set
follows the live tensors; without clear_refs, it falls back to ru_maxrss of a cold first call.
GPU memory: torch.cuda.max_memory_allocated over memory_allocated just before the call.
"""
import re
import resource
import statistics
import time

import torch

MIB = 1 << 20
PEAK_BANDWIDTH = {  # datasheet HBM bandwidth, bytes/s, matched on the device name
    "H200": 4.8e12,
    "H100 NVL": 3.9e12,
    "H100 PCIe": 2.0e12,
    "H100": 3.35e12,  # SXM
    "A100-SXM4-80GB": 2.039e12,
    "A100": 1.555e12,
}


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M).group(1))


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """with PeakMemory(device) as m: run() -> m.extra_bytes, m.baseline_bytes, m.method"""

    def __init__(self, device: str):
        self.device = device

    def __enter__(self):
        synchronize(self.device)
        if self.device == "cuda":
            self.baseline_bytes = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            self.method = "torch.cuda.max_memory_allocated - memory_allocated before the call"
        else:
            self.baseline_bytes = _status_kib("VmRSS") * 1024
            if _reset_hwm():
                self.method = "VmHWM after the call (reset by /proc/self/clear_refs) - VmRSS before it"
                self._read_peak = lambda: _status_kib("VmHWM") * 1024
            else:
                self.method = "ru_maxrss after the call - VmRSS before it (no clear_refs: cold call)"
                self._read_peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return self

    def __exit__(self, *exc):
        synchronize(self.device)
        peak = torch.cuda.max_memory_allocated() if self.device == "cuda" else self._read_peak()
        self.extra_bytes = max(0, peak - self.baseline_bytes)
        return False


def time_call(device: str, fn) -> float:
    """Seconds of one call of fn: CUDA events on the GPU (the launch queue is drained first), perf_counter on CPU."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def summarize(times: list) -> dict:
    ordered = sorted(times)
    quartiles = statistics.quantiles(ordered, n=4, method="inclusive") if len(ordered) > 1 else ordered * 3
    return {
        "times_s": times,
        "median_s": statistics.median(ordered),
        "p25_s": quartiles[0],
        "p75_s": quartiles[2],
        "min_s": ordered[0],
        "max_s": ordered[-1],
    }


_L2_FLUSH = {}


def flush_cache(device: str) -> None:
    """Evict the logits from the GPU's L2 (50 MB on an H100) so small shapes are not timed from cache."""
    if device == "cuda":
        if "buf" not in _L2_FLUSH:
            _L2_FLUSH["buf"] = torch.empty(256 * MIB, dtype=torch.uint8, device="cuda")
        _L2_FLUSH["buf"].zero_()


def copy_bandwidth(device: str, nbytes: int = 256 * MIB, repeats: int = 7) -> float:
    """Best achieved bytes/s of a large tensor copy (read + write), with torch's own threads."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch of the pages is not bandwidth
    best = min(time_call(device, lambda: dst.copy_(src)) for _ in range(repeats))
    return 2 * nbytes / best


def device_peak_bandwidth(device: str, measured_copy: float) -> tuple:
    """(bytes/s, source): the datasheet figure for known GPUs, else the copy bandwidth measured in this run."""
    if device == "cuda":
        name = torch.cuda.get_device_name()
        for key, value in PEAK_BANDWIDTH.items():
            if key in name:
                return value, f"datasheet HBM bandwidth of {key}"
    return measured_copy, "copy bandwidth measured in this run (torch copy_ of 256 MiB, best of 7)"
