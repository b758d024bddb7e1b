import json

import pytest

from erpo.train import data, tiny_task


def test_builtin_task_rows():
    rows = data.load("tiny:add1")
    assert len(rows) == 100 and rows[0]["prompt"] == "0+0=" and rows[-1]["answer"] == "18"


def test_jsonl_custom_fields(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"q": "1+1=", "a": 2}\n\n{"q": "2+2=", "a": "4", "extra": 1}\n')
    rows = data.load(str(path), "q", "a")
    assert [r["prompt"] for r in rows] == ["1+1=", "2+2="] and rows[0]["answer"] == "2"
    assert rows[1]["row"]["extra"] == 1


def test_bad_rows_reported_with_line_numbers(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = ['{"prompt": "ok", "answer": "1"}', "", '{"prompt": "   ", "answer": "1"}', "{not json",
             '{"answer": "3"}', '[1, 2]', '{"prompt": "x"}']
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError) as err:
        data.load(str(path))
    text = str(err.value)
    assert "5 bad row(s)" in text
    for expected in ("line 3: empty", "line 4: not valid JSON", "line 5: missing field 'prompt'",
                     "line 6: expected a JSON object", "line 7: missing field 'answer'"):
        assert expected in text
    assert "line 1" not in text


def test_empty_and_unknown_sources(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(ValueError, match="no rows"):
        data.load(str(path))
    with pytest.raises(ValueError, match="built-in task"):
        data.load("tiny:mul")
    with pytest.raises(ValueError, match="data file '.*missing.jsonl' does not exist"):
        data.load(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="'.*nowhere' does not exist"):
        data.load(str(tmp_path / "nowhere"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="not the built-in task, a .jsonl file"):
        data.load(str(tmp_path / "notes.txt"))


def test_saved_datasets_dir(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"prompt": "a", "answer": "b"}, {"prompt": "", "answer": "c"}]).save_to_disk(tmp_path / "ds")
    with pytest.raises(ValueError, match="line 1: empty"):
        data.load(str(tmp_path / "ds"))
    datasets.Dataset.from_list([{"prompt": "a", "answer": 1}]).save_to_disk(tmp_path / "ok")
    assert data.load(str(tmp_path / "ok"))[0]["answer"] == "1"


def test_holdout_split_is_disjoint_and_seeded():
    rows = data.load("tiny:add1")
    train, held = data.split_holdout(rows, 10, seed=3)
    assert len(train) == 90 and len(held) == 10
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    assert data.split_holdout(rows, 10, seed=3)[1] == held
    with pytest.raises(ValueError, match="leaves no training rows"):
        data.split_holdout(rows, 100, seed=0)


def test_sampler_covers_epochs_and_resumes_exactly():
    sampler = data.PromptSampler(10, seed=1)
    first = sampler.next_batch(7) + sampler.next_batch(7)
    assert sorted(first[:10]) == list(range(10))  # one full epoch before any repeat
    state = json.loads(json.dumps(sampler.state_dict()))
    expected = [sampler.next_batch(4) for _ in range(5)]
    resumed = data.PromptSampler(10, seed=1)
    resumed.load_state_dict(state)
    assert [resumed.next_batch(4) for _ in range(5)] == expected
    with pytest.raises(ValueError, match="rows"):
        data.PromptSampler(11, seed=1).load_state_dict(state)


def test_encode_prompt_uses_chat_template_when_present():
    tok = tiny_task.build_tokenizer()
    plain = data.encode_prompt(tok, "1+2=", chat_template=True)
    assert tok.decode(plain) == "^1+2="  # no template: BOS + text
    tok.chat_template = "{% for m in messages %}>{{ m['content'] }};{% endfor %}"
    templated = data.encode_prompt(tok, "1+2=", chat_template=True)
    assert tok.decode(templated) == ">1+2=;"
    assert data.encode_prompt(tok, "1+2=", chat_template=False) == plain
