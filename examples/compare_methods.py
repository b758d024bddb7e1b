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

from erpo.train import compare, stats
from erpo.train.metrics import read

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = ("grpo", "dapo", "dr_grpo", "erpo", "high_entropy_mask", "clip_cov", "kl_cov", "repo", "repo_r", "adapo")
# GRPO without its KL term is what the trap is about: the grpo preset's KL 0.04 anchors the policy to its
# random initialisation, a near-uniform distribution, which on the pure-RL task acts as an entropy bonus.
NO_KL_GRPO = "grpo:kl_coef=0"
# Baselines: GRPO on the built-in task (the question users ask: "does X beat GRPO?"); DAPO on the trap, where it
# is the method that locks in and every control preset (erpo, high_entropy_mask, clip_cov, ...) is DAPO plus
# that one control, so the paired difference isolates the control.
TASKS = {  # name: (shared-config arguments of erpo compare, seeds, methods)
    "builtin": (["--baseline", "grpo"], (0, 1, 2, 3, 4), METHODS),
    "entropy-trap": (["--config", "entropy_trap", "--baseline", "dapo"], (100, 101, 102, 103, 104),
                     (METHODS[0], NO_KL_GRPO, *METHODS[1:])),
}
COLUMNS = (("eval_pass@1", "eval", "pass@1"), ("reward", "window", "reward"), ("entropy", "window", "entropy"),
           ("response_len", "window", "length"))


def run_task(name: str, jobs: int, runs_root: str) -> list[compare.Run]:
    shared_args, seeds, methods = TASKS[name]
    out_dir = os.path.join(runs_root, f"compare-{name}")
    cmd = [sys.executable, "-m", "erpo", "compare", *shared_args, "--seeds", *map(str, seeds), "--jobs", str(jobs),
           "--out-dir", out_dir]
    for method in methods:
        cmd += ["--method", method]
    print(" ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True)
    results = os.path.join(HERE, "results", f"compare-{name}")
    os.makedirs(results, exist_ok=True)
    for file in ("report.md", "curves.png"):
        shutil.copy(os.path.join(out_dir, file), os.path.join(results, file))
    shared = compare.shared_values("entropy_trap" if "entropy_trap" in shared_args else None, [], None)
    return compare.plan(list(methods), list(seeds), shared, out_dir)


def cell(runs: list[compare.Run], method: str, key: str, how: str) -> str:
    window = max(1, min(25, runs[0].config.steps // 4))  # the window erpo compare's report uses
    values = [compare.final_value(read(os.path.join(r.dir, "metrics.jsonl")), key, how, window)
              for r in runs if r.method.label == method]
    interval = stats.mean_ci(values)
    return f"{interval.mean:.2f} ± {(interval.high - interval.low) / 2:.2f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=compare.default_jobs())
    parser.add_argument("--runs-root", default="runs")
    args = parser.parse_args()
    planned = {name: run_task(name, args.jobs, args.runs_root) for name in TASKS}
    head = " | ".join(f"{task} {label}" for task in TASKS for _, _, label in COLUMNS)
    lines = [f"| method | {head} |", "|---|" + "---:|" * (len(TASKS) * len(COLUMNS))]
    for method in dict.fromkeys(m for _, _, methods in TASKS.values() for m in methods):
        cells = [cell(planned[task], method, key, how) if method in TASKS[task][2] else "not run"
                 for task in TASKS for key, how, _ in COLUMNS]
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
