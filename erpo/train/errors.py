"""The ways a run stops on its own terms (not a user error): the CLI reports them in one line, exit code 1."""


class NonFiniteError(RuntimeError):
    """A NaN/inf loss or gradient with on_nonfinite='stop', or max_nonfinite skipped updates in a row."""


class CheckpointWriteError(RuntimeError):
    """Writing a checkpoint failed (disk full, I/O error); the previous checkpoints are intact."""


class RunsFailedError(Exception):
    """Some runs of `erpo compare` failed; the finished ones are kept and a rerun resumes the rest."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGINT) during `erpo train`: the message names the latest checkpoint and the resume command."""
