"""The errors of a run folder."""

from __future__ import annotations

from pathlib import Path

__all__ = ["DamagedChunkError", "RunError"]


class RunError(ValueError):
    """A run folder that cannot be used as asked (different settings, busy, unreadable)."""


class DamagedChunkError(RunError):
    """A chunk file that cannot be read back whole (truncated, corrupt, wrong checksum)."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path = Path(path)
        super().__init__(
            f"chunk {path} is damaged ({reason}); run the same explain command again to "
            "recompute its images"
        )
