"""PNG plots of a run's metrics.jsonl: reward, entropy, response length and eval pass@1 over steps.
Written at the end of training and by `erpo plot RUN_DIR`."""
import os

from erpo.train.metrics import read

PANELS = (("reward", "mean reward"), ("entropy", "entropy (nats/token)"), ("response_len", "response length (tokens)"),
          ("eval_pass@1", "eval pass@1"))


def smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in points], [float(p[1]) for p in points]


def plot_run(run_dir: str, out: str | None = None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise ValueError(f"{run_dir!r} has no metrics.jsonl: is it an `erpo train` run directory?")
    out = out or os.path.join(run_dir, "metrics.png")
    if os.path.isdir(out) or out.endswith(os.sep):  # a folder: the plot goes inside it, not beside it as FOLDER.png
        out = os.path.join(out, "metrics.png")
    if not os.path.splitext(out)[1]:
        out += ".png"  # what matplotlib would write anyway: say so, and return the real path
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise ValueError(f"--out {out!r}: folder {folder!r} does not exist")
    records = read(path)
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 3.2))
    for ax, (key, title) in zip(axes, PANELS):
        steps, values = series(records, key)
        if values:
            ax.plot(steps, values, lw=0.6, alpha=0.35, color="C0")
            if not key.startswith("eval"):
                ax.plot(steps, smooth(values, 25), lw=1.6, color="C0", label="25-step mean")
                ax.legend(fontsize=7)
            else:
                ax.plot(steps, values, "o-", color="C0")
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(os.path.basename(os.path.normpath(run_dir)), fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
