"""Checkpoints: written atomically, verified before they are loaded.

Layout of `RUN_DIR/checkpoints/step_000100/`:
    model/            `save_pretrained` output (config + model.safetensors) and the tokenizer: loadable on its own
    trainer_state.pt  optimizer, LR scheduler, loss controller, sampler position, step, RNG states of every rank
    sharded/          under FSDP (`--fsdp`) only: model and optimizer state as torch.distributed.checkpoint shards,
                      one file per rank (trainer_state.pt then holds no optimizer state)
    train_config.json the run's config
    MANIFEST.json     sha256 of every file above; written last

Everything is written into `.tmp-step_000100-<pid>/` and renamed into place, so a killed writer leaves only
a temp directory (ignored and cleaned up), never a half checkpoint under the final name. Loading checks the
manifest and every hash: a missing manifest (partial copy) or a changed file is an error that names it.
"""
import fcntl
import hashlib
import json
import os
import random
import re
import shutil
import time
from typing import Optional

import numpy as np
import torch
from transformers.utils import logging as hf_logging

MANIFEST = "MANIFEST.json"
STEP_DIR = re.compile(r"^step_(\d{6,})$")
# What makes a directory an `erpo train` run, and everything `--overwrite` deletes (nothing else in it).
RUN_ENTRIES = ("train_config.json", "metrics.jsonl", "metrics.png", "checkpoints", "vllm_init")


class CheckpointError(ValueError):
    pass


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, key, *rest = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(root: str) -> list[str]:
    out = []
    for folder, _, names in os.walk(root):
        out += [os.path.relpath(os.path.join(folder, n), root) for n in names]
    return sorted(f for f in out if f != MANIFEST)


def temp_dir(run_dir: str, step: int) -> str:
    """The fresh (empty) temp directory checkpoint `step` is written into before its rename. Under FSDP rank 0
    makes it and every rank writes its shards of `sharded/` into it before rank 0's `save(..., tmp=...)`."""
    root = os.path.join(run_dir, "checkpoints")
    os.makedirs(root, exist_ok=True)
    tmp = os.path.join(root, f".tmp-step_{step:06d}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def save(run_dir: str, step: int, model, tokenizer, trainer_state: dict, train_config: dict, keep: int = 0,
         model_state: Optional[dict] = None, tmp: Optional[str] = None) -> str:
    """Write checkpoint `step` atomically; delete the oldest beyond `keep` (0 = keep all). Returns its path.
    `tmp`: a `temp_dir` that already holds files of the checkpoint (FSDP's sharded state); they are hashed into
    the manifest with the rest and renamed into place together."""
    root = os.path.join(run_dir, "checkpoints")
    final = os.path.join(root, f"step_{step:06d}")
    if tmp is None:
        tmp = temp_dir(run_dir, step)
    try:
        _write(tmp, step, model, tokenizer, trainer_state, train_config, model_state)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed write (disk full, I/O error) leaves no debris
        raise
    if os.path.exists(final):  # a re-save of the same step: the old copy stays whole until the new one is in place
        old = os.path.join(root, f".tmp-old-step_{step:06d}-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    if keep:
        # The checkpoint just written is always kept, whatever other step numbers the directory holds.
        others = [s for s in list_steps(run_dir) if s != step]
        for old_step in others[: max(0, len(others) - (keep - 1))]:
            shutil.rmtree(os.path.join(root, f"step_{old_step:06d}"), ignore_errors=True)
    return final


def _write(tmp: str, step: int, model, tokenizer, trainer_state: dict, train_config: dict,
           model_state: Optional[dict] = None) -> None:
    hf_logging.disable_progress_bar()  # no per-save "Writing model shards" bar over the training progress
    # model_state: the full weights gathered from an FSDP-sharded model (None: the model's own)
    model.save_pretrained(os.path.join(tmp, "model"), safe_serialization=True, state_dict=model_state)
    tokenizer.save_pretrained(os.path.join(tmp, "model"))
    torch.save(trainer_state, os.path.join(tmp, "trainer_state.pt"))
    with open(os.path.join(tmp, "train_config.json"), "w", encoding="utf-8") as handle:
        json.dump(train_config, handle, indent=2, sort_keys=True)
    manifest = {"step": step, "files": {f: _sha256(os.path.join(tmp, f)) for f in _files(tmp)}}
    with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as handle:
        json.dump(manifest, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())


def holds_run(path: str) -> bool:
    return os.path.isdir(path) and any(os.path.exists(os.path.join(path, name)) for name in RUN_ENTRIES)


def remove_run(path: str) -> None:
    """Delete the run in `path` (what `--overwrite` replaces): erpo's own entries only, nothing else."""
    for name in RUN_ENTRIES:
        full = os.path.join(path, name)
        if os.path.isdir(full):
            shutil.rmtree(full)
        elif os.path.exists(full):
            os.remove(full)


def lock_run(run_dir: str) -> int:
    """Take the run directory's advisory lock for this process, or raise naming the process that holds it.

    The lock is a flock on the directory itself: nothing is written into the run (a refused process leaves it
    byte for byte as it was), and the kernel drops the lock when its process dies, SIGKILL included, so no stale
    lock outlives its run. Returns the descriptor; it stays open for as long as the process trains the run."""
    fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _lock_holder(fd)
        os.close(fd)
        raise ValueError(f"run directory {run_dir!r} is being trained by {holder}: wait for it to finish or stop it "
                         "first (two processes writing one run would interleave its metrics and checkpoints)") from None
    return fd


def _lock_holder(fd: int) -> str:
    """'process PID' of the flock on this directory, from /proc/locks (Linux), else 'another process'."""
    inode = os.fstat(fd).st_ino
    try:
        with open("/proc/locks", encoding="ascii") as handle:
            for line in handle:
                fields = line.split()  # "1: FLOCK ADVISORY WRITE <pid> <major>:<minor>:<inode> 0 EOF"
                if len(fields) > 5 and fields[1] == "FLOCK" and fields[5].rsplit(":", 1)[-1] == str(inode):
                    return f"process {fields[4]}"
    except OSError:
        pass
    return "another process"


def claim_run_dir(out_dir: str, overwrite: bool, resume: Optional[str], dist) -> tuple[str, Optional[int]]:
    """Where a run writes, and the lock of that directory (rank 0, when it exists already; the caller takes it
    when it creates the directory). An existing run is never touched unless this run continues it (resume) or
    replaces it on purpose (overwrite)."""
    from erpo.train import distributed

    source = os.path.dirname(os.path.dirname(os.path.normpath(resume))) if resume else None  # RUN/checkpoints/step_N
    if out_dir:
        run_dir = out_dir
    elif source:
        run_dir = source
    else:
        stamp = distributed.gather(time.strftime("%Y%m%d-%H%M%S"), dist)[0]
        run_dir, n = os.path.join("runs", stamp), 1
        while holds_run(run_dir):  # two runs started in the same second
            n += 1
            run_dir = os.path.join("runs", f"{stamp}-{n}")
    # The lock comes before anything in the directory is read, checked or replaced.
    lock = lock_run(run_dir) if dist.is_main and os.path.isdir(run_dir) else None
    try:
        _check_claim(run_dir, source, overwrite, resume, dist.is_main)
    except BaseException:
        if lock is not None:
            os.close(lock)
        raise
    return run_dir, lock


def _check_claim(run_dir: str, source: Optional[str], overwrite: bool, resume: Optional[str], is_main: bool) -> None:
    continuing = source is not None and os.path.realpath(run_dir) == os.path.realpath(source)
    if resume and overwrite:
        raise ValueError("--overwrite with --resume: a resume continues a run and never replaces one; to start "
                         "over in that directory, drop --resume")
    later = later_steps(resume) if continuing else []
    if later:  # continuing there would re-write those steps and cut the metrics back: the later run is lost
        steps = f"step{'s' * (len(later) > 1)} {', '.join(map(str, later))}"
        raise ValueError(f"--resume {resume!r} is not the run's latest checkpoint (it also has {steps}); resuming "
                         "it in place would overwrite them: continue it into a fresh directory with --out-dir NEW")
    if not continuing and holds_run(run_dir):
        if not overwrite or resume:
            what = "resume it with --resume" if not resume else "continue a checkpoint into a fresh directory"
            raise ValueError(f"out_dir {run_dir!r} already holds a run: {what}, pick another --out-dir, "
                             "or pass --overwrite to replace it (its checkpoints and metrics are deleted)")
        if is_main:
            remove_run(run_dir)
    if is_main:
        check_writable(run_dir)


def check_writable(run_dir: str) -> None:
    """Fail before any work when the run directory cannot be created or written. Folders it creates for the
    probe are removed again: a run that fails to start leaves nothing behind."""
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise ValueError(f"out_dir {run_dir!r} is a file, not a directory")
    created = []
    folder = os.path.abspath(run_dir)
    while not os.path.exists(folder):
        created.append(folder)
        folder = os.path.dirname(folder)
    try:
        os.makedirs(run_dir, exist_ok=True)
        probe = os.path.join(run_dir, f".write-probe-{os.getpid()}")
        with open(probe, "w", encoding="utf-8"):
            pass
        os.remove(probe)
    except OSError as err:
        raise ValueError(f"out_dir {run_dir!r} is not writable: {err.strerror or err}") from None
    finally:
        for path in created:  # deepest first; each was empty and made here
            try:
                os.rmdir(path)
            except OSError:
                break


def list_steps(run_dir: str) -> list[int]:
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    return sorted(int(m.group(1)) for m in map(STEP_DIR.match, os.listdir(root)) if m)


def clean_temp(run_dir: str) -> None:
    """Remove temp directories left by a writer that was killed (after restoring a half-swapped re-save)."""
    recover_swap(run_dir)
    root = os.path.join(run_dir, "checkpoints")
    if os.path.isdir(root):
        for name in os.listdir(root):
            if name.startswith((".tmp-step_", ".tmp-old-step_")):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def recover_swap(run_dir: str) -> None:
    """Finish a re-save that was killed between its two renames: the old copy goes back under its name."""
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return
    for name in os.listdir(root):
        match = re.match(r"^\.tmp-old-(step_\d{6,})-\d+$", name)
        if match and not os.path.exists(os.path.join(root, match.group(1))):
            os.replace(os.path.join(root, name), os.path.join(root, match.group(1)))


def resolve(path: str, what: str = "--resume") -> str:
    """A checkpoint directory, or a run directory (then its latest checkpoint). `what` names the argument."""
    if os.path.isfile(os.path.join(path, MANIFEST)) or STEP_DIR.match(os.path.basename(os.path.normpath(path))):
        return path
    if not os.path.isdir(path):
        raise CheckpointError(f"{what} {path!r}: no such directory")
    recover_swap(path)
    steps = list_steps(path)
    if not steps and holds_run(path) and what != "--resume":
        raise CheckpointError(f"{what} {path!r}: the run has no checkpoint yet (it stopped before its first one, or is "
                              "still before it), so there is nothing to load")
    if not steps and holds_run(path):
        raise CheckpointError(f"{what} {path!r}: the run stopped before its first checkpoint, so there is nothing to "
                              f"continue from; start it again with --out-dir {path} --overwrite")
    if not steps:
        raise CheckpointError(f"{what} {path!r}: no checkpoint found (expected {path}/checkpoints/step_NNNNNN/)")
    return os.path.join(path, "checkpoints", f"step_{steps[-1]:06d}")


def later_steps(checkpoint_path: str) -> list[int]:
    """Steps of the same run's checkpoints after `checkpoint_path` (RUN/checkpoints/step_N): what resuming it in
    place would overwrite."""
    match = STEP_DIR.match(os.path.basename(os.path.normpath(checkpoint_path)))
    run_dir = os.path.dirname(os.path.dirname(os.path.normpath(checkpoint_path)))
    return [s for s in list_steps(run_dir) if match and s > int(match.group(1))]


def verify(path: str) -> dict:
    """Check the manifest and every hash; return the manifest. Raises CheckpointError naming the problem."""
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_path):
        raise CheckpointError(
            f"checkpoint {path!r} is partial: it has no {MANIFEST} (its writing never finished); "
            "resume from an earlier checkpoint"
        )
    try:
        with open(manifest_path, encoding="utf-8") as handle:
            manifest = json.load(handle)
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"checkpoint {path!r}: {MANIFEST} is corrupt ({err})") from None
    for name, digest in files.items():
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            raise CheckpointError(f"checkpoint {path!r} is incomplete: {name} is missing")
        if _sha256(full) != digest:
            raise CheckpointError(f"checkpoint {path!r} is corrupt: {name} does not match its sha256 in {MANIFEST}")
    # Files not in the manifest (an editor's backup, .DS_Store, a note) are not part of the checkpoint: nothing
    # reads them, so they are ignored rather than blocking a resume.
    return manifest


def check_world(path: str, world: int) -> None:
    """Refuse to resume a checkpoint written by another number of processes, naming both."""
    written = load_trainer_state(path)["world"]
    if written != world:
        raise CheckpointError(
            f"checkpoint {path!r} was written by {written} processes and this run has {world}: resume it with "
            f"{written} (torchrun --nproc-per-node {written}); prompts_per_step is per rank and every rank's random "
            "streams are restored, so another number of processes would not continue the same run")


def load_trainer_state(path: str) -> dict:
    """The trainer state of a verified checkpoint (tensors and plain Python values only: weights_only)."""
    return torch.load(os.path.join(path, "trainer_state.pt"), map_location="cpu", weights_only=True)



def seed_all(seed: int) -> None:
    torch.manual_seed(seed)  # CPU and every CUDA device
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
