"""`erpo compare`: method specs, the plan's checks, and tiny end-to-end comparisons (2 methods x 2 seeds, a few
steps): the report and curves, reuse of finished runs, resume to more steps, refusal of a changed config."""
import json
import os
import subprocess
import sys

import pytest

from erpo.train import compare

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
SHARED = ["--set", "prompts_per_step=2", "--set", "mini_batches=2", "--set", "group_size=4", "--set",
          "sft_warmup_steps=3", "--set", "eval_every=2", "--set", "save_every=1", "--seeds", "0", "1", "--jobs", "2"]
METHODS = ["--method", "grpo", "--method", "erpo:gamma=3,mini_batches=1"]


def erpo_compare(out, *extra):
    return subprocess.run([sys.executable, "-m", "erpo", "compare", *METHODS, *SHARED, "--out-dir", str(out), *extra],
                          capture_output=True, text=True, timeout=600, env=ENV)


def test_method_specs():
    plain = compare.parse_method("grpo")
    assert plain.values == {"loss": "grpo", "loss_args": {}} and plain.slug == "grpo"
    composed = compare.parse_method("dapo:controls=high_entropy_mask,kl_cov,eps_high=0.3,mini_batches=2,lr=1e-3")
    assert composed.values == {"loss": "dapo", "mini_batches": 2, "lr": 1e-3,
                               "loss_args": {"controls": "high_entropy_mask,kl_cov", "eps_high": 0.3}}
    assert "/" not in composed.slug and ":" not in composed.slug
    with pytest.raises(ValueError, match="set by erpo compare itself"):
        compare.parse_method("grpo:seed=3")
    with pytest.raises(ValueError, match="is not key=value"):
        compare.parse_method("grpo:oops")


def test_plan_checks_every_run_before_any_starts(tmp_path):
    with pytest.raises(ValueError, match="unknown LossConfig key 'gamm'"):
        compare.plan(["grpo", "erpo:gamm=3"], [0], {"steps": 2}, str(tmp_path))
    with pytest.raises(ValueError, match="given twice"):
        compare.plan(["grpo", "grpo"], [0], {}, str(tmp_path))
    with pytest.raises(ValueError, match="--baseline 'dapo' is not one of"):
        compare.compare(["grpo"], [0], "dapo", str(tmp_path), 1, {"steps": 2})
    assert not os.listdir(tmp_path)  # nothing was started or written


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp") / "out"
    result = erpo_compare(out, "--steps", "2")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return out, result


def test_report_table_sentences_and_curves(compared):
    out, result = compared
    text = (out / "report.md").read_text()
    assert "| grpo |" in text and "| erpo:gamma=3,mini_batches=1 |" in text
    assert "erpo:gamma=3,mini_batches=1 vs grpo, final greedy pass@1: " in text and "over 2 seeds" in text
    assert "torch " in text and "transformers " in text and "commit " in text and "Wall time" in text
    assert (out / "curves.png").stat().st_size > 10_000
    for method in ("grpo", "erpo__gamma=3_mini_batches=1"):
        for seed in (0, 1):
            saved = json.loads((out / method / f"seed{seed}" / "train_config.json").read_text())
            assert saved["seed"] == seed and saved["prompts_per_step"] == 2
    saved = json.loads((out / "erpo__gamma=3_mini_batches=1" / "seed0" / "train_config.json").read_text())
    assert saved["loss"] == "erpo" and saved["loss_args"] == {"gamma": 3} and saved["mini_batches"] == 1


def test_rerun_reuses_then_extends_and_refuses_a_changed_config(compared):
    out, _ = compared
    logs = {p: p.read_bytes() for p in out.glob("*/seed*/metrics.jsonl")}
    assert len(logs) == 4
    again = erpo_compare(out, "--steps", "2")
    assert again.returncode == 0 and again.stdout.count("reused   ") == 4 and "started  " not in again.stdout
    assert all(p.read_bytes() == data for p, data in logs.items())  # finished runs untouched

    changed = erpo_compare(out, "--steps", "2", "--set", "lr=0.001")
    assert changed.returncode == 2 and "holds a run made with lr=0.0005" in changed.stderr
    assert all(p.read_bytes() == data for p, data in logs.items())

    longer = erpo_compare(out, "--steps", "3")
    assert longer.returncode == 0, longer.stderr[-3000:]
    assert longer.stdout.count("resumed  ") == 4
    for path, data in logs.items():
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert path.read_bytes().startswith(data) and rows[-1]["step"] == 3  # continued, nothing rewritten


def test_multiple_comparisons_keeps_only_what_survives_bonferroni():
    key = compare.FINAL[0][0]
    other = compare.FINAL[1][0]
    base = {s: 0.5 for s in range(5)}
    finals = {("base", key): base, ("base", other): base,
              # a large, consistent gain: significant at 95 % and at 1 - 0.05/4 = 98.75 %
              ("big", key): {s: 0.9 + 0.01 * s for s in range(5)}, ("big", other): base,
              # a small, noisy gain: its 95 % interval excludes 0, the 98.75 % one does not
              ("small", key): {0: 0.52, 1: 0.58, 2: 0.55, 3: 0.6, 4: 0.51}, ("small", other): base}
    from erpo.train import stats

    small95 = stats.paired_diff_ci(finals[("small", key)], base)
    assert small95.significant  # the case the correction is for
    line = compare.multiple_comparisons(["big", "small"], "base", finals)
    assert line.startswith("4 comparisons above") and "98.75 %" in line
    assert f"big ({compare.FINAL[0][1]})" in line and "small" not in line.split(":", 1)[1]
