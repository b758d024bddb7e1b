"""Prompt data: JSONL files, saved `datasets` directories, or the built-in task; plus the resumable sampler.

Every row becomes {"prompt": str, "answer": str, "row": original dict}. Bad rows (not a JSON object, missing
field, empty prompt) are all reported at once with their line (or row) numbers.
"""
import json
import os
import random

from erpo.train import tiny_task


def _check_row(row, prompt_field: str, answer_field: str):
    """Return (clean row, None) or (None, what is wrong with it)."""
    if not isinstance(row, dict):
        return None, f"expected a JSON object, got {type(row).__name__}"
    missing = [f for f in (prompt_field, answer_field) if f not in row]
    if missing:
        return None, f"missing field {', '.join(map(repr, missing))}"
    prompt = row[prompt_field]
    if not isinstance(prompt, str) or not prompt.strip():
        return None, f"empty or non-string prompt in field {prompt_field!r}"
    return {"prompt": prompt, "answer": str(row[answer_field]), "row": row}, None


def _check_rows(numbered_rows, prompt_field: str, answer_field: str, source: str) -> list[dict]:
    """numbered_rows: (line number, parsed row or an error string). All bad rows are reported together."""
    good, problems = [], []
    for number, row in numbered_rows:
        problem = row if isinstance(row, _Unparsed) else None
        if problem is None:
            clean, problem = _check_row(row, prompt_field, answer_field)
            if clean is not None:
                good.append(clean)
                continue
        problems.append(f"line {number}: {problem}")
    if problems:
        shown = "; ".join(problems[:20]) + (f"; ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise ValueError(f"{source}: {len(problems)} bad row(s): {shown}")  # one line, as every user error
    if not good:
        raise ValueError(f"{source}: no rows")
    return good


class _Unparsed(str):
    """A line that is not valid JSON (the string says why)."""


def read_jsonl(path: str, prompt_field: str = "prompt", answer_field: str = "answer") -> list[dict]:
    numbered = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                numbered.append((number, json.loads(line)))
            except json.JSONDecodeError as err:
                numbered.append((number, _Unparsed(f"not valid JSON ({err.msg})")))
    return _check_rows(numbered, prompt_field, answer_field, path)


def load(source: str, prompt_field: str = "prompt", answer_field: str = "answer") -> list[dict]:
    if source == tiny_task.DATA_NAME:
        return _check_rows(enumerate(tiny_task.problems()), "prompt", "answer", source)
    if source.startswith("tiny:"):
        raise ValueError(f"unknown built-in task {source!r}; the built-in task is {tiny_task.DATA_NAME!r}")
    if source.endswith((".jsonl", ".json")):
        if not os.path.isfile(source):
            raise ValueError(f"data file {source!r} does not exist")
        return read_jsonl(source, prompt_field, answer_field)
    if os.path.isdir(source):
        import datasets

        try:
            data = datasets.load_from_disk(source)
        except FileNotFoundError as err:  # a folder that is not a `save_to_disk` output
            raise ValueError(f"data {source!r} is a directory but not a saved `datasets` directory ({err})") from None
        if isinstance(data, datasets.DatasetDict):
            if "train" not in data:
                raise ValueError(f"{source}: a DatasetDict needs a 'train' split, has {list(data)}")
            data = data["train"]
        return _check_rows(enumerate(data), prompt_field, answer_field, f"{source} (rows numbered from 0)")
    if not os.path.exists(source):
        raise ValueError(f"data {source!r} does not exist (expected the built-in task {tiny_task.DATA_NAME!r}, a .jsonl "
                         "file or a saved `datasets` directory)")
    raise ValueError(f"data {source!r} is not the built-in task, a .jsonl file or a saved `datasets` directory")


def split_holdout(rows: list[dict], size: int, seed: int) -> tuple[list[dict], list[dict]]:
    if size >= len(rows):
        raise ValueError(f"eval_holdout={size} leaves no training rows (the data has {len(rows)})")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held = set(order[:size])
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]


class PromptSampler:
    """Reshuffled epochs over the rows, in batches; its position is two ints, so resuming is exact.

    The order of epoch e depends only on (seed, e), not on any global RNG.
    """

    def __init__(self, n_rows: int, seed: int):
        self.n_rows, self.seed = n_rows, seed
        self.epoch, self.offset = 0, 0

    def _order(self) -> list[int]:
        order = list(range(self.n_rows))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def next_batch(self, size: int) -> list[int]:
        picked = []
        while len(picked) < size:
            order = self._order()
            take = order[self.offset : self.offset + size - len(picked)]
            picked += take
            self.offset += len(take)
            if self.offset >= self.n_rows:
                self.epoch, self.offset = self.epoch + 1, 0
        return picked

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, "n_rows": self.n_rows, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["n_rows"] != self.n_rows:
            raise ValueError(f"checkpoint was taken on data of {state['n_rows']} rows, this data has {self.n_rows}")
        self.epoch, self.offset, self.seed = state["epoch"], state["offset"], state["seed"]


def encode_prompt(tokenizer, prompt: str, chat_template: bool) -> list[int]:
    """Token ids of a prompt, through the tokenizer's chat template when it has one (and it is wanted)."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]
