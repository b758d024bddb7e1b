"""`Support`: the truncation a rollout engine applied before sampling (plain data, no torch: LossConfig holds one and
the command line reads LossConfig without importing torch). Its meaning and row math: erpo/ops/support.py."""
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Support:
    """The truncation a rollout engine applied before sampling; None (or top_p 1, min_p 0) = not applied."""

    top_k: Optional[int] = None
    top_p: Optional[float] = None
    min_p: Optional[float] = None

    def __post_init__(self):
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)
                                       or self.top_k < 1):
            raise ValueError(f"Support.top_k must be an int >= 1 or None (no top-k), got {self.top_k!r}")
        if self.top_p is not None and not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"Support.top_p must be in (0, 1] or None (no top-p), got {self.top_p!r}")
        if self.min_p is not None and not (isinstance(self.min_p, (int, float)) and 0 <= self.min_p < 1):
            raise ValueError(f"Support.min_p must be in [0, 1) or None (no min-p), got {self.min_p!r}")

    def is_full(self, vocab: Optional[int] = None) -> bool:
        """Whether S is the whole vocabulary whatever the logits (then the full-vocabulary path runs, bit for bit)."""
        no_k = self.top_k is None or (vocab is not None and self.top_k >= vocab)
        return no_k and (self.top_p is None or self.top_p >= 1) and not self.min_p
