"""erpo's microbenchmarks: the fused op and the policy losses against naive GRPO (see bench/README.md).

Run from the repository root: `python -m bench --quick` (CI, seconds), `python -m bench` (CPU sweep),
`python -m bench --preset gpu` (the full GPU sweep). Each case runs in a fresh worker process
(`bench.worker`), so a crash or an out-of-memory in one case is reported, never fatal to the sweep.
"""
