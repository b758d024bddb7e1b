"""Rewards: a function (completion, answer, row) -> float, chosen by name or given as 'module:function'.

A reward that raises or runs past its time limit scores 0 and is reported with its sample; the run goes on.
The time limit uses SIGALRM, which only the main thread of a process can receive: that is where the trainer
scores (under torchrun every rank is its own process). Off the main thread rewards run without a limit.
math-verify's own timeouts also use SIGALRM, so they are switched off and the outer limit covers the call.
"""
import importlib
import logging
import math
import signal
import threading
from contextlib import contextmanager
from typing import Callable

from erpo.train.config import did_you_mean

RewardFn = Callable[[str, str, dict], float]


def exact_match(completion: str, answer: str, row: dict | None = None) -> float:
    return 1.0 if completion.strip() == answer.strip() else 0.0


def math_verify(completion: str, answer: str, row: dict | None = None) -> float:
    """1 when the completion's final (or boxed) answer equals the reference mathematically."""
    from math_verify import parse, verify

    # It warns on every call that its own timeout is off; the outer limit in `score` replaces it.
    logging.getLogger("math_verify").setLevel(logging.ERROR)

    gold_text = answer if "$" in answer or "\\boxed" in answer else f"${answer}$"  # bare LaTeX parses to [] otherwise
    gold = parse(gold_text, parsing_timeout=None)
    if not gold:
        raise ValueError(f"reference answer {answer!r} does not parse as math")
    pred = parse(completion, parsing_timeout=None)
    return 1.0 if verify(gold, pred, timeout_seconds=None) else 0.0


BUILTIN = {"exact_match": exact_match, "math_verify": math_verify}


def resolve(spec: str) -> RewardFn:
    if spec in BUILTIN:
        return BUILTIN[spec]
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"reward {spec!r} must be one of {sorted(BUILTIN)} or 'module:function'"
                         f"{did_you_mean(spec, BUILTIN)}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"reward {spec!r}: cannot import module {module_name!r} ({err})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"reward {spec!r}: module {module_name!r} has no function {attr!r}")
    return fn


class RewardTimeout(Exception):
    pass


def _on_alarm(signum, frame):
    raise RewardTimeout()


@contextmanager
def _time_limit(seconds: float):
    if seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def score(fn: RewardFn, completions: list[str], rows: list[dict], timeout: float) -> tuple[list[float], list[dict]]:
    """Score each completion against its row's answer. Returns (scores, problems); a problem is a dict with
    the sample index, prompt, completion, answer and the error, for the caller to report."""
    scores, problems = [], []
    for index, (completion, row) in enumerate(zip(completions, rows)):
        try:
            with _time_limit(timeout):
                value = float(fn(completion, row["answer"], row["row"]))
            if not math.isfinite(value):
                raise ValueError(f"reward returned {value}")
        except RewardTimeout:
            value, error = 0.0, f"timed out after {timeout} s"
            problems.append(_problem(index, row, completion, error))
        except Exception as err:  # a user reward may raise anything; the run must go on
            value = 0.0
            problems.append(_problem(index, row, completion, f"{type(err).__name__}: {err}"))
        scores.append(value)
    return scores, problems


def _problem(index: int, row: dict, completion: str, error: str) -> dict:
    return {"sample": index, "prompt": row["prompt"], "answer": row["answer"], "completion": completion, "error": error}
