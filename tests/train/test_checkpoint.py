import os
import random

import numpy as np
import pytest
import torch

from erpo.train import checkpoint, tiny_task


def _save(run_dir, step, keep=0):
    tok = tiny_task.build_tokenizer()
    model = tiny_task.build_model(tok)
    opt = torch.optim.AdamW(model.parameters())
    model(input_ids=torch.tensor([[1, 3, 4]]), labels=torch.tensor([[1, 3, 4]])).loss.backward()
    opt.step()
    state = {"step": step, "optimizer": opt.state_dict(), "rng": [checkpoint.rng_state()], "sampler": {"epoch": 1}}
    path = checkpoint.save(str(run_dir), step, model, tok, state, {"seed": 0}, keep=keep)
    return path, model, opt


def test_round_trip(tmp_path):
    path, model, opt = _save(tmp_path, 3)
    assert checkpoint.resolve(str(tmp_path)) == path
    manifest = checkpoint.verify(path)
    assert manifest["step"] == 3 and "model/model.safetensors" in manifest["files"]
    state = checkpoint.load_trainer_state(path)
    fresh = torch.optim.AdamW(model.parameters())
    fresh.load_state_dict(state["optimizer"])
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(os.path.join(path, "model"))
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_rng_states_restore_every_stream():
    state = checkpoint.rng_state()
    first = (torch.rand(3), random.random(), np.random.rand(2))
    checkpoint.set_rng_state(state)
    second = (torch.rand(3), random.random(), np.random.rand(2))
    assert torch.equal(first[0], second[0]) and first[1] == second[1] and np.array_equal(first[2], second[2])


def test_corrupt_file_is_detected(tmp_path):
    path, _, _ = _save(tmp_path, 1)
    weights = os.path.join(path, "model", "model.safetensors")
    with open(weights, "r+b") as handle:
        handle.seek(os.path.getsize(weights) // 2)
        byte = handle.read(1)
        handle.seek(-1, 1)
        handle.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(checkpoint.CheckpointError, match="corrupt: model/model.safetensors"):
        checkpoint.verify(path)


def test_partial_and_truncated_checkpoints_are_detected(tmp_path):
    path, _, _ = _save(tmp_path, 1)
    os.remove(os.path.join(path, "trainer_state.pt"))
    with pytest.raises(checkpoint.CheckpointError, match="trainer_state.pt is missing"):
        checkpoint.verify(path)
    path2, _, _ = _save(tmp_path, 2)
    os.remove(os.path.join(path2, checkpoint.MANIFEST))
    with pytest.raises(checkpoint.CheckpointError, match="partial"):
        checkpoint.verify(checkpoint.resolve(str(tmp_path)))  # the latest is the broken one: never skipped silently


def test_temp_dirs_are_ignored_and_cleaned(tmp_path):
    _save(tmp_path, 1)
    leftover = tmp_path / "checkpoints" / ".tmp-step_000002-123"
    leftover.mkdir()
    (leftover / "trainer_state.pt").write_bytes(b"half")
    assert checkpoint.list_steps(str(tmp_path)) == [1]
    checkpoint.clean_temp(str(tmp_path))
    assert not leftover.exists()


def test_keep_deletes_oldest_and_resolve_errors(tmp_path):
    for step in (1, 2, 3):
        _save(tmp_path, step, keep=2)
    assert checkpoint.list_steps(str(tmp_path)) == [2, 3]
    with pytest.raises(checkpoint.CheckpointError, match="no such directory"):
        checkpoint.resolve(str(tmp_path / "elsewhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint found"):
        checkpoint.resolve(str(tmp_path / "empty"))


def test_retention_never_deletes_the_checkpoint_just_written(tmp_path):
    for step in (10, 20, 30):  # e.g. left by another run in the same directory
        _save(tmp_path, step)
    path, _, _ = _save(tmp_path, 5, keep=1)
    assert checkpoint.list_steps(str(tmp_path)) == [5] and checkpoint.resolve(str(tmp_path)) == path
    _save(tmp_path, 6, keep=2)
    assert checkpoint.list_steps(str(tmp_path)) == [5, 6]


def test_stray_file_in_a_checkpoint_does_not_block_resume(tmp_path):
    path, _, _ = _save(tmp_path, 4)
    (tmp_path / "checkpoints" / "step_000004" / ".DS_Store").write_bytes(b"\x00junk")
    (tmp_path / "checkpoints" / "notes.txt").write_text("mine")
    assert checkpoint.verify(checkpoint.resolve(str(tmp_path)))["step"] == 4


def test_resave_of_a_step_killed_between_its_renames_is_recovered(tmp_path):
    path, _, _ = _save(tmp_path, 7)
    manifest = checkpoint.verify(path)
    # The state a kill leaves after the old copy was moved aside and before the new one took its name:
    os.replace(path, os.path.join(tmp_path, "checkpoints", ".tmp-old-step_000007-4242"))
    assert checkpoint.resolve(str(tmp_path)) == path
    assert checkpoint.verify(path) == manifest
    checkpoint.clean_temp(str(tmp_path))
    assert checkpoint.list_steps(str(tmp_path)) == [7]


@pytest.mark.parametrize("errno_code", [28, 5])  # ENOSPC, EIO
def test_failed_write_leaves_previous_checkpoint_and_no_debris(tmp_path, monkeypatch, errno_code):
    first, _, _ = _save(tmp_path, 1, keep=1)
    manifest = checkpoint.verify(first)
    real_save = torch.save

    def failing_save(obj, path, *args, **kwargs):
        with open(path, "wb") as handle:
            handle.write(b"half a file")
        raise OSError(errno_code, os.strerror(errno_code))

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError):
        _save(tmp_path, 2, keep=1)
    monkeypatch.setattr(torch, "save", real_save)
    assert checkpoint.list_steps(str(tmp_path)) == [1] and checkpoint.verify(first) == manifest
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_000001"]
