"""The README's figures of the built-in task: `erpo train --seed S` (everything else at its defaults) per seed.

    python examples/builtin_task.py --seeds 0 1 2 --jobs 1 --runs-dir runs/builtin

Seed 0 is exactly the README's command 1 (`erpo train`). A run whose metrics are complete is reused; a killed
one is resumed. Writes examples/results/builtin_task.md: sampled reward (mean of the first and last 25 steps),
greedy pass@1 on all 100 problems (step 0 and the last step), entropy (same windows), wall time, versions.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def read(path):
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def run_all(methods, seeds, steps, runs_dir, jobs, extra):
    pending = []
    for method in methods:
        for seed in seeds:
            out = os.path.join(runs_dir, f"{method}_s{seed}")
            log = os.path.join(out, "metrics.jsonl")
            if os.path.exists(log) and sum(1 for r in read(log) if "reward" in r) >= steps:
                continue
            if os.path.isdir(os.path.join(out, "checkpoints")) and os.listdir(os.path.join(out, "checkpoints")):
                cmd = [sys.executable, "-m", "erpo", "train", "--resume", out, "--no-progress"]  # its own config
            else:  # nothing to resume from: start over (erpo never replaces a run unless told to)
                cmd = [sys.executable, "-m", "erpo", "train", "--loss", method, "--seed", str(seed), "--steps",
                       str(steps), "--out-dir", out, "--no-progress", "--threads", "1", "--overwrite", *extra]
            pending.append((cmd, out))
    running = []
    while pending or running:
        while pending and len(running) < jobs:
            cmd, out = pending.pop(0)
            os.makedirs(out, exist_ok=True)
            running.append(subprocess.Popen(cmd, stdout=open(out + ".log", "w"), stderr=subprocess.STDOUT))
            print("started", " ".join(cmd[2:]))
        running[0].wait()
        if running[0].returncode != 0:
            raise SystemExit(f"run failed: {' '.join(running[0].args)} (see its .log)")
        running.pop(0)


def window(records, key, lo, hi):
    values = [r[key] for r in records if lo <= r["step"] <= hi and isinstance(r.get(key), (int, float))]
    return sum(values) / len(values) if values else float("nan")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--runs-dir", default="runs/builtin")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "builtin_task.md"))
    args = parser.parse_args()
    run_all(["grpo"], args.seeds, args.steps, args.runs_dir, args.jobs, [])

    import torch
    import transformers

    rows = []
    for seed in args.seeds:
        records = read(os.path.join(args.runs_dir, f"grpo_s{seed}", "metrics.jsonl"))
        train = [r for r in records if "reward" in r]
        evals = [r for r in records if "eval_pass@1" in r]
        last = train[-1]["step"]
        minutes, seconds = divmod(round(sum(r["step_time"] for r in train)), 60)
        rows.append(
            f"| S={seed} | {window(train, 'reward', 1, 25):.3f} → {window(train, 'reward', last - 24, last):.3f} | "
            f"{evals[0]['eval_pass@1']:.2f} → {evals[-1]['eval_pass@1']:.2f} | "
            f"{window(train, 'entropy', 1, 25):.2f} → {window(train, 'entropy', last - 24, last):.2f} | "
            f"{minutes} min {seconds:02d} s |"
        )
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout
    text = (
        f"Measured {time.strftime('%Y-%m-%d')}, commit {commit.strip() or 'unknown'}, {platform.processor() or 'CPU'} "
        f"({os.cpu_count()} cores), torch {torch.__version__}, transformers {transformers.__version__}, float32, "
        f"1 thread; `erpo train --seed S` with every other option at its default ({args.steps} steps). "
        "Reproduce: `python examples/builtin_task.py`. Training time is the sum of the logged step times (the "
        "machine may have been shared; the metrics do not depend on it).\n\n"
        "| `erpo train --seed S` | sampled reward (steps 1–25 → last 25) | greedy pass@1 (step 0 → last) | "
        "entropy (steps 1–25 → last 25) | training time |\n|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as handle:
        handle.write(text)
    print(text)


if __name__ == "__main__":
    main()
