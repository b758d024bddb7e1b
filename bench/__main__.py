"""python -m bench [--quick | --preset cpu|gpu] [--out DIR] [--cases a,b] [--n ...] [--v ...] [--dtypes ...]

Runs the sweep, prints the markdown table and writes results.json, results.md and the plots to --out
(default bench/results/<preset>, or bench/results/gpu-<device> for the GPU preset)."""
import argparse
import json
import os
import re
import sys

import torch

from bench import cases, report, runner
from bench.inputs import Shape
from bench.presets import PRESETS


def _ints(text):
    return tuple(int(x) for x in text.split(","))


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="shape sweep (default: gpu when CUDA is available, else cpu)")
    p.add_argument("--quick", action="store_true", help="same as --preset quick: tiny CPU shapes, about a minute (CI)")
    p.add_argument("--out", default=None, help="output folder (default bench/results/<preset>)")
    p.add_argument("--cases", default=None, help=f"comma list of cases (default all): {','.join(cases.BY_NAME)}")
    p.add_argument("--kinds", default=None,
                   help="op (bare logprobs_and_entropy), loss (policy losses), linear (losses from hidden states + LM "
                        "head); default all three, but only op,loss when --n/--v/--dtypes override the shapes "
                        "without --hidden (the linear shapes carry H)")
    p.add_argument("--n", type=_ints, default=None, help="override the preset's token counts, e.g. 1024,4096")
    p.add_argument("--v", type=_ints, default=None, help="override the preset's vocab sizes")
    p.add_argument("--dtypes", default=None, help="override the preset's dtypes, e.g. bfloat16,float32")
    p.add_argument("--hidden", type=int, default=None, help="H of the linear kind with --n/--v (default 1024)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per case")
    p.add_argument("--isolate", choices=("case", "shape"), default=None,
                   help="a fresh worker per case (clean CPU peak RSS) or per shape (faster)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per worker (default: all cores)")
    p.add_argument("--merge", action="store_true",
                   help="merge into --out's existing results.json (re-measured rows replaced): run a sweep in pieces")
    p.add_argument("--pool", action="store_true",
                   help="like --merge, but a row measured in both runs pools their timed samples (repeated sweeps)")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        if args.preset not in (None, "quick"):
            p.error("--quick conflicts with --preset " + args.preset)
        args.preset = "quick"
    return args


def _shapes(preset, args):
    if not (args.n or args.v or args.dtypes or args.hidden):
        return None  # the preset's own shapes (and its loss and linear shapes)
    ns = args.n or sorted({s.n_tokens for s in preset.shapes})
    vs = args.v or sorted({s.vocab for s in preset.shapes})
    dtypes = args.dtypes.split(",") if args.dtypes else sorted({s.dtype for s in preset.shapes})
    for d in dtypes:
        if d not in ("float32", "bfloat16", "float16"):
            raise SystemExit(f"unknown dtype {d!r}: use float32, bfloat16 or float16")
    return tuple(Shape(n, v, d, args.hidden or 1024) for d in dtypes for v in vs for n in ns)


def selected_kinds(args) -> tuple:
    """--kinds, or all three; only op,loss when --n/--v/--dtypes override the shapes without --hidden."""
    overridden = bool(args.n or args.v or args.dtypes) and not args.hidden
    return tuple((args.kinds or ("op,loss" if overridden else "op,loss,linear")).split(","))


def main(argv=None) -> int:
    args = parse(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    preset = PRESETS[args.preset or ("gpu" if device == "cuda" else "cpu")]
    if preset.name == "gpu" and device != "cuda":
        raise SystemExit("--preset gpu needs a CUDA GPU (torch.cuda.is_available() is False here)")
    overrides = {k: getattr(args, k) for k in ("repeats", "isolate", "threads") if getattr(args, k) is not None}
    if overrides:
        preset = type(preset)(**{**preset.__dict__, **overrides})
    selected = set(args.cases.split(",")) if args.cases else None
    unknown = (selected or set()) - set(cases.BY_NAME)
    if unknown:
        raise SystemExit(f"unknown case(s) {sorted(unknown)}; known: {', '.join(cases.BY_NAME)}")
    kinds = selected_kinds(args)
    if set(kinds) - set(cases.MODES):
        raise SystemExit(f"--kinds must be a comma list of {', '.join(cases.MODES)}")
    out = args.out
    if out is None:
        suffix = preset.name
        if device == "cuda":
            suffix = "gpu-" + re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")
        out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", suffix)
    os.makedirs(out, exist_ok=True)

    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    sweep = runner.run_sweep(preset, device, selected, kinds, _shapes(preset, args), log=log)
    previous = os.path.join(out, "results.json")
    if (args.merge or args.pool) and os.path.exists(previous):
        with open(previous) as f:
            sweep = runner.merge(json.load(f), sweep, pool=args.pool)
    table = report.markdown(sweep)
    print(table)
    report.write_json(sweep, os.path.join(out, "results.json"))
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table)
    written = [] if args.no_plots else report.plots(sweep, out)
    log(f"wrote {out}/results.json, results.md" + (", " + ", ".join(map(os.path.basename, written)) if written else ""))
    bad = [r for r in sweep["results"] if r.get("status") == "error" or r.get("agrees_with_naive") is False]
    for r in bad:
        log(f"FAILED {r['case']} {r['kind']} {r['method']} {r['mode']} N={r['n_tokens']} V={r['vocab']} "
            f"{r['dtype']}: {r.get('reason') or 'checksum differs from naive'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
