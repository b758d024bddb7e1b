"""Every trainer method on both built-in tasks over 5 seeds, with `erpo compare`; the README's method table.

    python examples/compare_methods.py --jobs 2

Task "built-in": `erpo train`'s defaults (40-step supervised warm-up, then RL), seeds 0-4.
Task "entropy-trap": the built-in recipe `--config entropy_trap` (pure RL from random weights), seeds 100-104
(seeds 0-2 were used to design the task; no method was tuned on any of them).
Runs go to runs/compare-<task>/ (finished runs are reused, killed ones resumed); each task's report.md and
curves.png are copied to examples/results/compare-<task>/, and the table of both tasks is written to
examples/results/methods.md.
"""
import argparse
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass

from erpo.train import compare, stats
from erpo.train.metrics import read

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = ("grpo", "dapo", "dr_grpo", "erpo", "high_entropy_mask", "clip_cov", "kl_cov", "repo", "repo_r", "adapo")
# GRPO without its KL term is what the trap is about: the grpo preset's KL 0.04 anchors the policy to its
# random initialisation, a near-uniform distribution, which on the pure-RL task acts as an entropy bonus.
NO_KL_GRPO = "grpo:kl_coef=0"


@dataclass(frozen=True)
class Task:
    config: str | None  # a built-in recipe or config file shared by every run; None = erpo train's defaults
    baseline: str
    seeds: tuple
    methods: tuple


# Baselines: GRPO on the built-in task (the question users ask: "does X beat GRPO?"); DAPO on the trap, where it
# is the method that locks in and every control preset (erpo, high_entropy_mask, clip_cov, ...) is DAPO plus
# that one control, so the paired difference isolates the control.
TASKS = {
    "builtin": Task(None, "grpo", (0, 1, 2, 3, 4), METHODS),
    "entropy-trap": Task("entropy_trap", "dapo", (100, 101, 102, 103, 104), (METHODS[0], NO_KL_GRPO, *METHODS[1:])),
}
# Column headers of erpo compare's final metrics (compare.FINAL), in its order.
SHORT = {"eval_pass@1": "pass@1", "reward": "reward", "entropy": "entropy", "response_len": "length"}


def run_task(name: str, task: Task, jobs: int, runs_root: str) -> dict:
    """Run (or reuse) the task's comparison, copy its report, and return {method: {metric: [final value per seed]}}."""
    out_dir = os.path.join(runs_root, f"compare-{name}")
    cmd = [sys.executable, "-m", "erpo", "compare", "--baseline", task.baseline, "--seeds", *map(str, task.seeds),
           "--jobs", str(jobs), "--out-dir", out_dir]
    cmd += ["--config", task.config] if task.config else []
    for method in task.methods:
        cmd += ["--method", method]
    print(" ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True)
    results = os.path.join(HERE, "results", f"compare-{name}")
    os.makedirs(results, exist_ok=True)
    for file in ("report.md", "curves.png"):
        shutil.copy(os.path.join(out_dir, file), os.path.join(results, file))
    runs = compare.plan(list(task.methods), list(task.seeds), compare.shared_values(task.config, [], None), out_dir)
    window = max(1, min(25, runs[0].config.steps // 4))  # the window erpo compare's report uses
    finals = {method: {key: [] for key, _, _ in compare.FINAL} for method in task.methods}
    for run in runs:
        records = read(os.path.join(run.dir, "metrics.jsonl"))
        for key, _, how in compare.FINAL:
            finals[run.method.label][key].append(compare.final_value(records, key, how, window))
    return finals


def cell(values: list[float]) -> str:
    interval = stats.mean_ci(values)
    return f"{interval.mean:.2f} ± {(interval.high - interval.low) / 2:.2f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=compare.default_jobs())
    parser.add_argument("--runs-root", default="runs")
    args = parser.parse_args()
    finals = {name: run_task(name, task, args.jobs, args.runs_root) for name, task in TASKS.items()}
    head = " | ".join(f"{name} {SHORT[key]}" for name in TASKS for key, _, _ in compare.FINAL)
    lines = [f"| method | {head} |", "|---|" + "---:|" * (len(TASKS) * len(compare.FINAL))]
    for method in dict.fromkeys(m for task in TASKS.values() for m in task.methods):
        cells = [cell(finals[name][method][key]) if method in finals[name] else "not run"
                 for name in TASKS for key, _, _ in compare.FINAL]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    text = ("Mean ± half-width of the 95 % t interval over 5 seeds. pass@1: greedy, all 100 problems, last "
            "evaluation; reward, entropy (nats/token), length (tokens, EOS included): means of the last 25 training "
            "steps. Reports with versions, commit, configs, paired differences and curves: "
            + ", ".join(f"[`{t}`](compare-{t}/report.md)" for t in TASKS) + ". Reproduce: "
            "`python examples/compare_methods.py`.\n\n" + "\n".join(lines) + "\n")
    with open(os.path.join(HERE, "results", "methods.md"), "w", encoding="utf-8") as handle:
        handle.write(text)
    print(text)


if __name__ == "__main__":
    main()
