import sys
import time

import pytest

from erpo.train import rewards


def row(answer):
    return {"prompt": "p", "answer": answer, "row": {"id": 7}}


def test_exact_match():
    assert rewards.exact_match(" 12\n", "12") == 1.0 and rewards.exact_match("121", "12") == 0.0


def test_math_verify_boxed_and_final_answer():
    fn = rewards.resolve("math_verify")
    scores, problems = rewards.score(
        fn, ["so \\boxed{\\frac{1}{2}}", "The answer is 0.5", "The answer is 3", "\\boxed{x+1}"],
        [row("1/2"), row("$\\frac{1}{2}$"), row("1/2"), row("1+x")], timeout=10,
    )
    assert scores == [1.0, 1.0, 0.0, 1.0] and problems == []


def _module(tmp_path, monkeypatch, body):
    (tmp_path / "user_reward_mod.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("user_reward_mod", None)


def test_user_function_gets_row(tmp_path, monkeypatch):
    _module(tmp_path, monkeypatch, "def score(c, a, row):\n    return float(len(c)) + row['id']\n")
    fn = rewards.resolve("user_reward_mod:score")
    assert rewards.score(fn, ["abc"], [row("x")], timeout=5) == ([10.0], [])


def test_raising_and_slow_rewards_score_zero_and_are_reported(tmp_path, monkeypatch):
    _module(tmp_path, monkeypatch,
            "import time\n"
            "def f(c, a, row):\n"
            "    if c == 'boom': raise KeyError('bad key')\n"
            "    if c == 'slow': time.sleep(5)\n"
            "    if c == 'nan': return float('nan')\n"
            "    return 1.0\n")
    fn = rewards.resolve("user_reward_mod:f")
    start = time.perf_counter()
    scores, problems = rewards.score(fn, ["ok", "boom", "slow", "nan"], [row("a")] * 4, timeout=0.3)
    assert time.perf_counter() - start < 3
    assert scores == [1.0, 0.0, 0.0, 0.0]
    assert [p["sample"] for p in problems] == [1, 2, 3]
    assert "KeyError" in problems[0]["error"] and problems[0]["completion"] == "boom"
    assert "timed out" in problems[1]["error"] and "nan" in problems[2]["error"]


def test_bad_specs():
    with pytest.raises(ValueError, match="module:function"):
        rewards.resolve("nonsense")
    with pytest.raises(ValueError, match="cannot import"):
        rewards.resolve("no_such_module_xyz:f")
    with pytest.raises(ValueError, match="no function"):
        rewards.resolve("math:no_such_fn")
