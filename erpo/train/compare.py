"""`erpo compare`: methods x seeds of `erpo train`, run in parallel, summarised with confidence intervals.

    erpo compare --method grpo --method erpo --method "dapo:controls=high_entropy_mask" --seeds 0 1 2 3 4

A method is a preset name, optionally with knobs after a colon: `NAME:key=value,key=value`. A key that is a
TrainConfig field (mini_batches, lr, ...) sets that; any other key is a LossConfig knob (loss_args). A value
may itself hold commas (`dapo:controls=high_entropy_mask,kl_cov,eps_high=0.3`: a piece without `=` continues
the previous value). Every run gets the same shared config (--config, --set) and differs only in its method
and seed, so the methods of one seed start from the same model and see the same prompts.

Layout: OUT/<method>/seed<S>/ is an ordinary run directory (erpo train --resume works on it), OUT/<method>/
seed<S>.log its console output, OUT/report.md and OUT/curves.png the summary. Resumable: a finished run is
reused and never touched; a run with a checkpoint is resumed; a run killed before its first checkpoint (no
weights to keep) is started again. A run directory made with another config is refused, never replaced.
"""
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from erpo.train import checkpoint, config as config_lib, stats
from erpo.train.errors import RunsFailedError
from erpo.train.metrics import read

# Keys that say how a run reports, not what it trains: they may differ between a reused run and the plan.
NOT_TRAINING = {"out_dir", "resume", "overwrite", "progress", "plots", "threads", "save_every", "keep_checkpoints"}
# (metric, label, how a run's final value is read: "eval" = last eval record, "window" = mean of the last steps)
FINAL = (("eval_pass@1", "final greedy pass@1", "eval"), ("reward", "final sampled reward", "window"),
         ("entropy", "final entropy", "window"), ("response_len", "final response length", "window"))
PANELS = (("reward", "sampled reward"), ("eval_pass@1", "greedy pass@1 (eval)"), ("entropy", "entropy (nats/token)"),
          ("response_len", "response length (tokens)"), ("clip_frac", "clip fraction (low + high)"),
          ("masked_frac", "masked / selected token fraction"))
# The range each panel's quantity can take: its shaded t interval is clipped to it (a t interval knows no bounds:
# over a few seeds near 0 its low end goes below 0). None = unbounded on that side. Rewards: see band_range.
RANGES = {"eval_pass@1": (0.0, 1.0), "entropy": (0.0, None), "response_len": (0.0, None), "clip_frac": (0.0, 1.0),
          "masked_frac": (0.0, 1.0)}


@dataclass
class Method:
    label: str
    values: dict  # TrainConfig overrides: loss, loss_args, other fields

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.=-]+", "_", self.label.replace(":", "__"))


def typed(key: str, text: str):
    """A key=value's value: YAML-typed (0.2 -> float, true -> bool), and numbers in a form YAML 1.1 leaves a
    string (1e-3) read as the config field's type."""
    value = config_lib.parse_loss_arg(f"{key}={text}")[1]
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
        kind = config_lib._TYPES.get(key)
        return int(number) if kind is int and number.is_integer() else number
    return value


def parse_method(spec: str) -> Method:
    name, _, knobs = spec.partition(":")
    name = name.strip()
    if not name:
        raise ValueError(f"--method {spec!r}: give a method name, e.g. 'erpo' or 'dapo:controls=high_entropy_mask'")
    values: dict = {"loss": name, "loss_args": {}}
    pairs: list[list[str]] = []
    for piece in (p.strip() for p in knobs.split(",")) if knobs else ():
        if "=" in piece:
            key, _, value = piece.partition("=")
            pairs.append([key.strip(), value.strip()])
        elif pairs and piece:
            pairs[-1][1] += "," + piece
        elif piece:
            raise ValueError(f"--method {spec!r}: {piece!r} is not key=value")
    for key, text in pairs:
        key = key.replace("-", "_")
        if key in ("loss", "seed", "out_dir", "resume", "overwrite"):
            raise ValueError(f"--method {spec!r}: {key} is set by erpo compare itself")
        value = typed(key, text)
        if key in config_lib.FIELDS:
            values[key] = value
        else:
            values["loss_args"][key] = value
    return Method(spec, values)


@dataclass
class Run:
    method: Method
    seed: int
    dir: str
    config: config_lib.TrainConfig

    @property
    def log(self) -> str:
        return self.dir + ".log"


def plan(methods: list[str], seeds: list[int], shared: dict, out_dir: str) -> list[Run]:
    parsed = [parse_method(m) for m in methods]
    slugs = [m.slug for m in parsed]
    if len(set(slugs)) != len(slugs):
        raise ValueError(f"--method given twice: {methods}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds given twice: {seeds}")
    runs = []
    for method in parsed:
        for seed in seeds:
            loss_args = {**shared.get("loss_args", {}), **method.values["loss_args"]}
            values = {**shared, **method.values, "loss_args": loss_args, "seed": seed, "progress": False,
                      "plots": False, "threads": shared.get("threads") or 1}
            run_dir = os.path.join(out_dir, method.slug, f"seed{seed}")
            values["out_dir"] = run_dir
            runs.append(Run(method, seed, run_dir, config_lib.from_dict(values, f"--method {method.label!r}")))
    for run in runs:  # a bad loss knob fails here, before any run starts
        from erpo.train.trainer import loss_config

        loss_config(run.config)
    return runs


def _saved_config(run_dir: str) -> dict | None:
    path = os.path.join(run_dir, "train_config.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def state(run: Run) -> str:
    """'finished' | 'resume' | 'fresh' | 'restart' (killed before its first checkpoint); a run dir made with
    another config raises."""
    if not checkpoint.holds_run(run.dir):
        return "fresh"
    saved = _saved_config(run.dir)
    if saved is not None:
        want = run.config.to_dict()
        differ = [k for k in want if k not in NOT_TRAINING and k in saved and saved[k] != want[k] and k != "steps"]
        if differ:
            k = differ[0]
            raise ValueError(f"{run.dir!r} holds a run made with {k}={saved[k]!r}, but this comparison asks for "
                             f"{k}={want[k]!r}: pick another --out-dir (a finished run is never replaced)")
    steps = checkpoint.list_steps(run.dir)
    if steps and steps[-1] >= run.config.steps:
        if steps[-1] > run.config.steps:
            raise ValueError(f"{run.dir!r} ran to step {steps[-1]}, this comparison asks for {run.config.steps} steps")
        return "finished"
    return "resume" if steps else "restart"


def command(run: Run, how: str) -> list[str]:
    base = [sys.executable, "-m", "erpo", "train", "--no-progress", "--no-plots"]
    if how == "resume":
        return base + ["--resume", run.dir, "--steps", str(run.config.steps)]
    path = run.dir + ".config.json"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump({k: v for k, v in run.config.to_dict().items() if k != "overwrite"}, handle, indent=2)
    # "restart": the run was killed before its first checkpoint; only its partial log goes.
    return base + ["--config", path] + (["--overwrite"] if how == "restart" else [])


def execute(runs: list[Run], jobs: int, say=print) -> list[str]:
    """Run what is not finished, `jobs` at a time. Returns the failures (one line each)."""
    todo = [(run, state(run)) for run in runs]
    for run, how in todo:
        if how == "finished":
            say(f"reused   {run.dir} (finished)")

    def one(item):
        run, how = item
        say(f"{'resumed' if how == 'resume' else 'started'}  {run.dir}")
        os.makedirs(os.path.dirname(run.log), exist_ok=True)
        cmd = command(run, how)
        with open(run.log, "a", encoding="utf-8") as log:
            code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
        say(f"{'done' if code == 0 else 'FAILED'}     {run.dir}" + ("" if code == 0 else f" (exit {code}, see {run.log})"))
        return None if code == 0 else f"{run.dir}: exit {code}, see {run.log}"

    pending = [item for item in todo if item[1] != "finished"]
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return [f for f in pool.map(one, pending) if f]


# --- summary ---------------------------------------------------------------------------------------
def _train_records(records: list[dict]) -> list[dict]:
    return [r for r in records if "reward" in r]


def final_value(records: list[dict], key: str, how: str, window: int) -> float:
    if how == "eval":
        evals = [r[key] for r in records if isinstance(r.get(key), (int, float))]
        return float(evals[-1]) if evals else math.nan
    train = _train_records(records)[-window:]
    values = [float(r[key]) for r in train if isinstance(r.get(key), (int, float))]
    return sum(values) / len(values) if values else math.nan


def _value(record: dict, key: str):
    if key == "clip_frac":
        parts = [record.get("clip_frac_low"), record.get("clip_frac_high")]
        return sum(parts) if all(isinstance(p, (int, float)) for p in parts) else None
    value = record.get(key)
    return value if isinstance(value, (int, float)) else None


def band_range(key: str, values: list[float]) -> tuple[float | None, float | None]:
    """The valid range of a curve's quantity. Rewards are user-defined: bounded below by 0 only when no logged
    reward value is negative (the built-in rewards are 0/1)."""
    if key == "reward":
        finite = [v for v in values if math.isfinite(v)]
        return (0.0, None) if finite and min(finite) >= 0 else (None, None)
    return RANGES.get(key, (None, None))


def band(values: list[float], low: float | None = None, high: float | None = None) -> stats.Interval:
    """Mean over seeds and its 95 % t interval, the interval's ends clipped to [low, high] (None: no bound).
    NaN ends (fewer than 2 seeds) stay NaN."""
    interval = stats.mean_ci(values)

    def clip(x):
        if math.isnan(x):
            return x
        if low is not None and x < low:
            x = low
        if high is not None and x > high:
            x = high
        return x

    return stats.Interval(interval.mean, clip(interval.low), clip(interval.high), interval.n)


def curve_bands(runs: list[Run], records: dict, key: str, smooth_window: int) -> dict:
    """{method label: (steps, [band per step])} for one panel: the seeds' (smoothed) values at each step, their
    mean and its interval clipped to the quantity's range (band_range)."""
    from erpo.train.plots import smooth

    out = {}
    for label in dict.fromkeys(r.method.label for r in runs):
        per_seed = {}
        for run in runs:
            if run.method.label != label:
                continue
            points = [(r["step"], _value(r, key)) for r in records[run.dir]]
            points = [(s, v) for s, v in points if v is not None]
            if key != "eval_pass@1":
                points = list(zip([s for s, _ in points], smooth([v for _, v in points], smooth_window)))
            per_seed[run.seed] = dict(points)
        steps = sorted({s for series in per_seed.values() for s in series})
        if not steps:
            continue
        low, high = band_range(key, [v for series in per_seed.values() for v in series.values()])
        out[label] = (steps, [band([series[s] for series in per_seed.values() if s in series], low, high)
                              for s in steps])
    return out


def curves(runs: list[Run], records: dict, path: str, smooth_window: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    labels = list(dict.fromkeys(r.method.label for r in runs))
    # The default cycle repeats after 10 colours: beyond that, tab20 keeps every method's colour its own.
    palette = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    colors = {label: palette(i % palette.N) for i, label in enumerate(labels)}
    for ax, (key, title) in zip(axes.flat, PANELS):
        for label, (steps, bands) in curve_bands(runs, records, key, smooth_window).items():
            line = ax.plot(steps, [b.mean for b in bands], label=label, color=colors[label])[0]
            ax.fill_between(steps, [b.low for b in bands], [b.high for b in bands], color=line.get_color(), alpha=0.2,
                            linewidth=0)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"mean over seeds, 95 % t interval shaded (clipped to each quantity's range); training curves "
                 f"smoothed over {smooth_window} steps")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(interval: stats.Interval) -> str:
    if interval.n == 0:
        return "n/a"
    if interval.n < 2:
        return f"{interval.mean:.3f} (1 seed)"
    return f"{interval.mean:.3f} [{interval.low:.3f}, {interval.high:.3f}]"


def _commit() -> str:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=root,
                             timeout=10)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                text=True, cwd=root, timeout=10).stdout  # not stripped: "XY path" lines
        changed = [line[3:] for line in status.splitlines() if line.strip()]
        listed = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
        return (out.stdout.strip() or "unknown") + (f" (with uncommitted changes to {listed})" if changed else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"


def multiple_comparisons(others: list[str], baseline: str, finals: dict) -> str:
    """Each interval above is 95 % on its own; over k of them about 5 % x k are expected to exclude 0 by chance.
    Bonferroni: the differences that stay significant with every interval at 1 - 0.05 / k."""
    k = len(others) * 2
    level = 1 - 0.05 / k
    kept = [f"{label} ({name})" for label in others for key, name, _ in FINAL[:2]
            if stats.paired_diff_ci(finals[(label, key)], finals[(baseline, key)], level).significant]
    return (f"{k} comparisons above: about {0.05 * k:.1f} would look significant by chance alone. Still significant "
            f"with Bonferroni's correction (each interval at {level * 100:.2f} %): " + (", ".join(kept) or "none") + ".")


def report(runs: list[Run], baseline: str, out_dir: str, shared: dict, wall_s: float) -> str:
    import torch
    import transformers

    import erpo

    records = {run.dir: read(os.path.join(run.dir, "metrics.jsonl"), partial_tail=True) for run in runs}
    steps = runs[0].config.steps
    window = max(1, min(25, steps // 4))
    labels = list(dict.fromkeys(r.method.label for r in runs))
    seeds = sorted({r.seed for r in runs})
    finals = {(run.method.label, key): {} for run in runs for key, _, _ in FINAL}
    train_s = {}
    for run in runs:
        for key, _, how in FINAL:
            finals[(run.method.label, key)][run.seed] = final_value(records[run.dir], key, how, window)
        train_s[run.method.label] = train_s.get(run.method.label, 0.0) + sum(
            r.get("step_time", 0.0) for r in _train_records(records[run.dir]))
    lines = [f"# erpo compare: {', '.join(labels)} over seeds {seeds}", ""]
    header = "| method | " + " | ".join(label for _, label, _ in FINAL) + " | training time (sum over seeds) |"
    lines += [f"Mean over {len(seeds)} seeds with its 95 % t interval. Greedy pass@1 is the last evaluation; the "
              f"other columns are means of the last {window} training steps of each run.", "", header,
              "|" + "---|" * (len(FINAL) + 2)]
    for label in labels:
        cells = [_fmt(stats.mean_ci(list(finals[(label, key)].values()))) for key, _, _ in FINAL]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {train_s[label] / 60:.1f} min |")
    if baseline in labels and len(labels) > 1:
        lines += ["", f"## Against the baseline {baseline} (paired by seed, 95 % t interval of the differences)", ""]
        others = [label for label in labels if label != baseline]
        for label in others:
            for key, name, _ in FINAL[:2]:
                diff = stats.paired_diff_ci(finals[(label, key)], finals[(baseline, key)])
                lines.append(f"- {stats.sentence(label, baseline, name, diff)}")
        lines += ["", multiple_comparisons(others, baseline, finals)]
    curves_path = os.path.join(out_dir, "curves.png")
    curves(runs, records, curves_path, smooth_window=max(1, steps // 60))
    per_method = {key for run in runs for key in run.method.values}
    config = {k: v for k, v in runs[0].config.to_dict().items()
              if k not in per_method | {"seed", "out_dir", "resume", "overwrite", "progress", "plots"}}
    described = []
    for label in labels:
        run = next(r for r in runs if r.method.label == label)
        own = {k: getattr(run.config, k) for k in sorted(per_method)}
        described.append(f"`{label}`: {json.dumps(own, sort_keys=True)}")
    lines += [
        "", "![curves](curves.png)", "",
        "## How this was measured", "",
        f"- Date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; erpo {erpo.__version__} at commit {_commit()}; "
        f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}; "
        f"{platform.machine()} with {os.cpu_count()} CPU cores; device of the runs: {runs[0].config.device}.",
        f"- Wall time of this `erpo compare` call: {wall_s / 60:.1f} min (runs reused from an earlier call cost "
        "nothing here; training time above is the sum of each run's logged step times, on a possibly shared machine).",
        "- Methods (the keys any method sets; everything else is shared): " + "; ".join(described),
        f"- Shared config: `{json.dumps(config, sort_keys=True)}`",
        f"- Runs: {out_dir}/<method>/seed<S> (each an `erpo train` run directory with its train_config.json).",
    ]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "report.md"), "w", encoding="utf-8") as handle:
        handle.write(text)
    return text


def shared_values(config_path: str | None, settings: list[str], steps: int | None) -> dict:
    values = config_lib.load_file(config_path) if config_path else {}
    for text in settings or ():
        key, _, raw = text.partition("=")
        key = key.strip().replace("-", "_")
        if not _ or not key:
            raise ValueError(f"--set expects key=value, got {text!r}")
        value = typed(key, raw.strip())
        if key not in config_lib.FIELDS:
            raise config_lib._unknown(key, "--set")
        if key in ("loss", "seed", "out_dir", "resume", "overwrite"):
            raise ValueError(f"--set {key}: set by erpo compare itself (use --method / --seeds / --out-dir)")
        values[key] = value
    if steps is not None:
        values["steps"] = steps
    return values


def compare(methods: list[str], seeds: list[int], baseline: str | None, out_dir: str, jobs: int,
            shared: dict, say=print) -> str:
    if not methods:
        raise ValueError("give at least one --method")
    start = time.perf_counter()
    runs = plan(methods, seeds, shared, out_dir)
    baseline = baseline or runs[0].method.label
    if baseline not in {r.method.label for r in runs}:
        raise ValueError(f"--baseline {baseline!r} is not one of the --method values {methods}")
    os.makedirs(out_dir, exist_ok=True)
    failures = execute(runs, jobs, say)
    if failures:
        raise RunsFailedError("runs failed (finished runs are kept; rerun the same command to resume):\n  "
                           + "\n  ".join(failures))
    return report(runs, baseline, out_dir, shared, time.perf_counter() - start)


def default_jobs() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

