"""The `erpo` command: `erpo train`, `erpo compare`, `erpo eval`, `erpo plot`, `erpo bench`
(also `python -m erpo ...`)."""
import argparse
import difflib
import os
import sys


class _Parser(argparse.ArgumentParser):
    """argparse's errors as one line `erpo <command>: error: ...` (exit 2), not a usage block above it."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}; `{self.prog} --help` lists the options\n")


def _unknown_flags(parser: argparse.ArgumentParser, command: str, extra: list) -> None:
    """Refuse arguments no option takes, naming each, with the closest option of the command."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    known = [flag for action in sub._actions for flag in action.option_strings if flag.startswith("--")]
    parts = []
    for arg in extra:
        close = difflib.get_close_matches(arg.split("=", 1)[0], known, n=1) if arg.startswith("-") else []
        parts.append(f"{arg} (did you mean {close[0]}?)" if close else arg)
    sub.error(f"unrecognized arguments: {' '.join(parts)}")


def _train(args) -> int:
    from erpo.train import config as config_lib

    config = config_lib.from_args(args)  # a bad flag or config fails here, before torch and transformers load
    from erpo.train.trainer import train

    train(config)
    return 0


def _compare(args) -> int:
    from erpo.train import compare

    shared = compare.shared_values(args.config, args.set, args.steps)
    jobs = args.jobs or compare.default_jobs()
    text = compare.compare(args.method or [], args.seeds, args.baseline, args.out_dir, jobs, shared,
                           say=lambda line: print(line, flush=True))
    print(text)
    print(f"report: {os.path.join(args.out_dir, 'report.md')}")
    return 0


def _eval(args) -> int:
    import json

    from erpo.train import checkpoint, data, model as model_lib, rewards, rollout
    from erpo.train.evaluate import evaluate

    if args.temperature < 0 or args.max_new_tokens < 0:
        raise ValueError(f"--temperature must be >= 0 (0 = greedy) and --max-new-tokens >= 0 (0 = the run's), got "
                         f"{args.temperature} and {args.max_new_tokens}")
    path = checkpoint.resolve(args.checkpoint, "checkpoint")
    checkpoint.verify(path)
    with open(f"{path}/train_config.json", encoding="utf-8") as handle:
        train_cfg = json.load(handle)
    policy, tokenizer = model_lib.load_policy(f"{path}/model", "", 0, 0)
    source = args.data or train_cfg["eval_data"] or train_cfg["data"]
    rows = data.load(source, train_cfg["prompt_field"], train_cfg["answer_field"])
    result = evaluate(
        rollout.HFRollout(policy, tokenizer), tokenizer, rows, rewards.resolve(args.reward or train_cfg["reward"]),
        chat_template=train_cfg["chat_template"], max_new_tokens=args.max_new_tokens or train_cfg["max_new_tokens"],
        temperature=args.temperature, reward_timeout=train_cfg["reward_timeout"],
        score_truncated=train_cfg["score_truncated"],
    )
    print(json.dumps({"checkpoint": path, "data": source, **result}, indent=2))
    return 0


def _plot(args) -> int:
    from erpo.train.plots import plot_run

    print(plot_run(args.run_dir, args.out))
    return 0


def _source_checkout() -> str | None:
    """The repository root erpo was installed from (editable install or plain checkout), if it has bench/."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return root if os.path.isfile(os.path.join(root, "bench", "__main__.py")) else None


def _bench(argv: list) -> int:
    root = _source_checkout()
    if root is None:
        raise ValueError("`erpo bench` runs the benchmark suite of erpo's source checkout (bench/), which this "
                         "install does not have: clone the repository and `pip install -e .` from it")
    if root not in sys.path:
        sys.path.insert(0, root)
    from bench.__main__ import main as bench_main

    return bench_main(argv)


def build_parser() -> argparse.ArgumentParser:
    from erpo.train import config as config_lib

    parser = _Parser(prog="erpo", description="Entropy-regulated RL of language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser(
        "train", help="train a policy with RL from verifiable rewards",
        description="Train a policy with RL from verifiable rewards. With no arguments: the built-in CPU task "
        "(1-2 digit addition, tiny Llama). Options come from --config FILE (YAML or TOML, same key names "
        "with underscores) and flags; flags win. Multi-process: torchrun --nproc-per-node N -m erpo train ...",
    )
    config_lib.add_arguments(train)
    train.set_defaults(run=_train)

    cmp = sub.add_parser(
        "compare", help="methods x seeds of `erpo train` in parallel, one report with 95 %% intervals",
        description="Train every --method on every seed (same shared config otherwise), in parallel jobs, and "
        "write OUT/report.md (table, differences vs the baseline with 95 %% paired t intervals) and OUT/curves.png. "
        "Rerunning the same command reuses finished runs and resumes interrupted ones.",
    )
    cmp.add_argument("--method", action="append", metavar="SPEC",
                     help="a preset ('grpo', 'erpo') or NAME:key=value,... with LossConfig or TrainConfig keys "
                     "(e.g. 'dapo:controls=high_entropy_mask'); repeat for each method")
    cmp.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds of every method [default: 0 1 2]")
    cmp.add_argument("--baseline", default=None, help="the method the others are compared to [default: the first]")
    cmp.add_argument("--out-dir", default="runs/compare", help="where runs and the report go [default: runs/compare]")
    cmp.add_argument("--jobs", type=int, default=0, help="runs at a time [default: the CPU cores available]")
    cmp.add_argument("--steps", type=int, default=None, help="steps of every run [default: erpo train's]")
    cmp.add_argument("--config", default=None, help="YAML/TOML file of shared erpo train keys, or a built-in "
                     f"recipe: {', '.join(config_lib.recipes())}")
    cmp.add_argument("--set", action="append", metavar="KEY=VALUE", help="a shared erpo train key (repeatable)")
    cmp.set_defaults(run=_compare)

    ev = sub.add_parser("eval", help="score a checkpoint: pass@1 and mean response length")
    ev.add_argument("checkpoint", help="a checkpoint directory, or a run directory (its latest checkpoint)")
    ev.add_argument("--data", default="", help="prompts to score (default: the run's eval data, else its data)")
    ev.add_argument("--reward", default="", help="reward (default: the run's)")
    ev.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0 = greedy)")
    ev.add_argument("--max-new-tokens", type=int, default=0, help="response length limit (default: the run's)")
    ev.set_defaults(run=_eval)

    plot = sub.add_parser("plot", help="write PNG plots of a run's metrics")
    plot.add_argument("run_dir", help="an `erpo train` run directory (holds metrics.jsonl)")
    plot.add_argument("--out", default=None, help="output PNG (default RUN_DIR/metrics.png)")
    plot.set_defaults(run=_plot)

    bench = sub.add_parser("bench", help="kernel and loss benchmarks (forwards to `python -m bench`, source checkout)",
                           add_help=False)
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments for `python -m bench` (try --help)")
    bench.set_defaults(run=lambda args: _bench(args.bench_args))
    return parser


def _fail(command: str, message: str, code: int) -> int:
    print(f"erpo {command}: error: {message}", file=sys.stderr)
    return code


def main(argv=None) -> int:
    """Exit codes: 0 done; 2 a user error (bad flag, config, path, data, checkpoint), one line on stderr, no
    traceback; 1 a run that stopped on its own terms (NaN/inf, a failed checkpoint write), one line saying
    how to continue; 130 interrupted."""
    from erpo.train.errors import CheckpointWriteError, NonFiniteError, RunsFailedError

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # everything after it belongs to `python -m bench`, options included
        command, run = "bench", lambda: _bench(argv[1:])
    else:
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        if extra:
            _unknown_flags(parser, args.command, extra)
        command, run = args.command, lambda: args.run(args)
    try:
        return run()
    except (ValueError, TypeError) as err:
        return _fail(command, str(err), 2)
    except OSError as err:  # a path the user gave that cannot be read or written
        where = f" {err.filename!r}" if err.filename else ""
        return _fail(command, f"{err.strerror or err}{where}", 2)
    except (NonFiniteError, CheckpointWriteError, RunsFailedError) as err:
        return _fail(command, str(err), 1)
    except KeyboardInterrupt as err:  # a run names its latest checkpoint and the resume command
        return _fail(command, str(err) or "interrupted", 130)


if __name__ == "__main__":
    sys.exit(main())
