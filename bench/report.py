"""Writers of a sweep: a markdown table (also printed), the JSON of every figure, and PNG plots."""
import json
import os

MIB = 1 << 20
MODE_TITLE = {"fwd": "forward", "fwdbwd": "forward+backward"}


def _panel(r) -> str:
    what = "logprobs_and_entropy" if r["kind"] == "op" else f"{r['method']} loss"
    if r["kind"] == "linear":
        what = f"{r['method']} loss from hidden states (H = {r.get('hidden_size')})"
    return f"{what}, {MODE_TITLE[r['mode']]}"


def _fmt(value, spec, missing="–"):
    return missing if value is None else format(value, spec)


def _check(r) -> str:
    if "agrees_with_naive" not in r:
        return ""
    return "ok" if r["agrees_with_naive"] else f"DIFFERS ({r['checksum_rel_diff']:.1e})"


def markdown(sweep: dict) -> str:
    meta = sweep["meta"]
    lines = [
        f"Device: {meta['device_name']} ({meta['device']}, {meta['cpu_count']} CPUs, {meta['torch_threads']} torch "
        f"threads); torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}; commit "
        f"{meta['git_commit'][:10]}{' (dirty)' if meta['git_dirty'] else ''}; {meta['date_utc']}; preset "
        f"`{meta['preset']}`.",
        f"Peak bandwidth for the % column: {meta['peak_bandwidth_Bps'] / 1e9:.1f} GB/s "
        f"({meta['peak_bandwidth_source']}). Load average start/end: {meta['loadavg_start'][0]:.2f} / "
        f"{meta['loadavg_end'][0]:.2f}.",
    ]
    if meta.get("runs"):
        lines.append(f"Pooled over {len(meta['runs'])} runs (every timed sample of every run; peak memory: median "
                     "of the runs): " + "; ".join(
                         f"{run['date_utc']} commit {run['git_commit'][:10]}, load {run['loadavg_start'][0]:.1f} -> "
                         f"{run['loadavg_end'][0]:.1f}" for run in meta["runs"]) + ".")
    lines.append("")
    panel = None
    for r in sweep["results"]:
        if _panel(r) != panel:
            panel = _panel(r)
            lines += [
                "", f"**{panel}**", "",
                "| dtype | N | V | case | median ms | IQR ms | peak extra MiB | GB/s | % peak | speed-up vs naive "
                "| memory ÷ vs naive | check |",
                "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
            ]
        head = f"| {r['dtype']} | {r['n_tokens']} | {r['vocab']} | {r['case']} |"
        if r.get("status") != "ok":
            lines.append(f"{head} {r['status'].upper()} | | | | | | | {r.get('reason', '')} |")
            continue
        lines.append(
            f"{head} {r['median_s'] * 1e3:.2f} | {(r['p75_s'] - r['p25_s']) * 1e3:.2f} | "
            f"{r['peak_extra_bytes'] / MIB:.1f} | {r['bandwidth_Bps'] / 1e9:.1f} | {100 * r['bandwidth_fraction']:.1f} | "
            f"{_fmt(r.get('speedup_vs_naive'), '.2f', r.get('vs_naive', '–'))} | "
            f"{_fmt(r.get('memory_ratio_vs_naive'), '.1f', r.get('vs_naive', '–'))} | {_check(r)} |"
        )
    lines += [
        "",
        "Time: median of the timed calls (IQR = 75th - 25th percentile), inputs regenerated outside the timer. "
        "Peak extra memory: " + next((r["memory_method"] for r in sweep["results"] if "memory_method" in r), "–") +
        ". GB/s: minimal bytes (logits read once forward; read again + gradient written once backward) / median "
        "time. Ratios are naive ÷ case (> 1 is better). check: the case's logp/entropy sums (forward) or loss and "
        "gradient norm (backward) agree with naive's.",
    ]
    return "\n".join(lines) + "\n"


def write_json(sweep: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(sweep, f, indent=1)


def plots(sweep: dict, out_dir: str) -> list:
    """time, peak memory and bandwidth fraction against N: one panel per (what, mode, dtype, V)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {}
    for r in sweep["results"]:
        panels.setdefault((r["kind"] != "op", _panel(r), r["dtype"], r["vocab"]), []).append(r)
    panels = {k: v for k, v in panels.items() if any(r.get("status") in ("ok", "oom") for r in v)}
    metrics = [
        ("time_vs_n.png", "median time (ms)", lambda r: r["median_s"] * 1e3, True),
        ("memory_vs_n.png", "peak extra memory (MiB)", lambda r: r["peak_extra_bytes"] / MIB, True),
        ("bandwidth_fraction.png", "fraction of peak bandwidth", lambda r: r["bandwidth_fraction"], False),
    ]
    written = []
    columns = min(3, max(1, len(panels)))
    rows = (len(panels) + columns - 1) // columns
    for filename, label, value, log_y in metrics:
        fig, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 3.8 * rows), squeeze=False)
        for ax, ((_, title, dtype, vocab), rs) in zip(axes.flat, sorted(panels.items())):
            by_case = {}
            for r in rs:
                by_case.setdefault(r["case"], []).append(r)
            for name, crs in by_case.items():
                ok = sorted((r for r in crs if r.get("status") == "ok"), key=lambda r: r["n_tokens"])
                if ok:
                    line, = ax.plot([r["n_tokens"] for r in ok], [value(r) for r in ok], marker="o", label=name)
                    color = line.get_color()
                else:
                    color = None
                for r in crs:
                    if r.get("status") == "oom":  # OOM: an x on the axis at this N
                        ax.scatter([r["n_tokens"]], [0.02], marker="x", s=70, color=color or "red",
                                   transform=ax.get_xaxis_transform(), label=f"{name} OOM" if not ok else None)
            ax.set_xscale("log", base=2)
            if log_y:
                ax.set_yscale("log")
            else:
                ax.set_ylim(0, 1.05)
                ax.axhline(1.0, color="grey", lw=0.8, ls="--")
            ax.set_title(f"{title}\n{dtype}, V={vocab}", fontsize=9)
            ax.set_xlabel("tokens N")
            ax.set_ylabel(label)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        meta = sweep["meta"]
        fig.suptitle(f"{meta['device_name']} · torch {meta['torch']} · {meta['date_utc'][:10]} (x on the axis = OOM)",
                     fontsize=10)
        fig.tight_layout()
        path = os.path.join(out_dir, filename)
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written
