"""Metrics: appended to RUN_DIR/metrics.jsonl (one JSON object per step or eval) and shown live in a rich
progress bar. On resume the log is cut back to the checkpoint's step, so it never holds a step twice."""
import json
import math
import os
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

# (metric key, short label, format) shown in the progress bar, in this order
LIVE = (
    ("reward", "R", ".3f"), ("entropy", "H", ".3f"), ("cdp_rate", "cdp", ".2f"), ("clip_frac_low", "clip-", ".3f"),
    ("clip_frac_high", "clip+", ".3f"), ("approx_kl", "kl_old", ".4f"), ("shift_ratio_std", "ratio_sd", ".3f"), ("kl_ref", "kl_ref", ".4f"),
    ("response_len", "len", ".2f"),
    ("tokens_per_s", "tok/s", ".0f"), ("eval_pass@1", "eval", ".3f"),
)


def _plain(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible as strings
    return value


class MetricsLog:
    def __init__(self, path: str, resume_step: int | None = None):
        self.path = path
        if resume_step is not None and os.path.exists(path):
            # Rows past the checkpoint are trained again; a last line cut short by a kill is dropped.
            kept = [line for line in read(path, partial_tail=True) if line.get("step", 0) <= resume_step]
            tmp = f"{path}.tmp-{os.getpid()}"
            with open(tmp, "w", encoding="utf-8") as handle:
                handle.writelines(json.dumps(line) + "\n" for line in kept)
            os.replace(tmp, path)  # atomic: a kill here leaves the old log, never a truncated one

    def write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({k: _plain(v) for k, v in record.items()}) + "\n")


def read(path: str, partial_tail: bool = False) -> list[dict]:
    """The records of a metrics.jsonl. `partial_tail`: a last line without its newline (the writer was killed
    mid-line) is skipped instead of failing."""
    with open(path, encoding="utf-8") as handle:
        lines = handle.readlines()
    if partial_tail and lines and not lines[-1].endswith("\n"):
        lines = lines[:-1]
    records = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: line {number} is not valid JSON ({err.msg})") from None
    return records


def reward_summary(path: str, span: int = 25) -> str:
    """The run's reward at its start and its end, over every step in metrics.jsonl (a resumed run included)."""
    rewards = [r["reward"] for r in read(path, partial_tail=True) if isinstance(r.get("reward"), (int, float))]
    if not rewards:
        return ""
    k = min(span, len(rewards))
    first, last = sum(rewards[:k]) / k, sum(rewards[-k:]) / k
    return f"mean reward: first {k} steps {first:.3f} -> last {k} steps {last:.3f} (of {len(rewards)} steps)"


class _BarAndMetrics(Progress):
    """The bar on one line, the live metrics below it (wrapped to the terminal, never squeezing the bar)."""

    metrics_line = ""

    def get_renderables(self):
        yield self.make_tasks_table(self.tasks)
        yield Text(self.metrics_line, style="dim")


class LiveProgress:
    """A rich progress bar whose description carries the latest metrics; a no-op when disabled.

    When stderr is not a terminal (nohup, CI, a pipe) a bar would show nothing until the end, so the same
    metrics go to stdout as one plain line every `every` steps or `every_s` seconds, whichever comes first."""

    def __init__(self, total: int, start: int, enabled: bool, every: int = 0, every_s: float = 30.0):
        self.console = Console(stderr=True)
        self.plain = enabled and not self.console.is_terminal
        self.enabled = enabled and not self.plain
        self.total, self.every, self.every_s = total, every or max(1, total // 20), every_s
        self.last_line = (start, time.monotonic())
        self.shown: dict = {}
        if self.enabled:
            self.progress = _BarAndMetrics(
                TextColumn("[bold]erpo train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TextColumn("eta"), TimeRemainingColumn(), console=self.console,
            )
            self.task = self.progress.add_task("train", total=total, completed=start)

    def __enter__(self):
        if self.enabled:
            self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self.progress.__exit__(*exc)

    def update(self, step: int, metrics: dict) -> None:
        self.shown.update({k: metrics[k] for k, _, _ in LIVE if k in metrics})
        text = " ".join(f"{label} {_plain(self.shown[k]):{fmt}}" for k, label, fmt in LIVE if k in self.shown
                        and isinstance(_plain(self.shown[k]), (int, float)))
        if self.enabled:
            self.progress.metrics_line = text
            self.progress.update(self.task, completed=step)
        elif self.plain and step > self.last_line[0]:
            last_step, last_time = self.last_line
            now = time.monotonic()
            if step - last_step >= self.every or now - last_time >= self.every_s or step == self.total:
                per_step = (now - last_time) / (step - last_step)
                print(f"step {step}/{self.total} {text} ({per_step:.2f} s/step, eta "
                      f"{per_step * (self.total - step):.0f} s)", flush=True)
                self.last_line = (step, now)

    def log(self, message: str) -> None:
        (self.progress.console if self.enabled else self.console).print(message, highlight=False)
