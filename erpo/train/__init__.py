"""The trainer: `erpo train`, `erpo eval`, `erpo compare` (see docs/trainer.md)."""
