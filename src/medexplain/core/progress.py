"""The one progress display (Rich): description, bar, n/total, status, elapsed time and ETA.

Every long loop (explaining a dataset, training, alignment checks, PEPPR) uses
:func:`progress_bar`, so all of them look alike and all show an ETA. Tasks may carry a
``status`` field (``add_task(..., status="loss 0.31")``, ``update(task, status=...)``) shown
next to the count; tasks without one show nothing there.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class _StatusColumn(ProgressColumn):
    """The task's optional ``status`` field, empty when the task has none."""

    def render(self, task: Task) -> Text:
        return Text(str(task.fields.get("status", "")))


class _Silent:
    """Stands in for :class:`rich.progress.Progress` when progress is disabled."""

    def add_task(self, *args: Any, **kwargs: Any) -> int:
        return 0

    def advance(self, *args: Any, **kwargs: Any) -> None:
        pass

    def update(self, *args: Any, **kwargs: Any) -> None:
        pass


@contextmanager
def progress_bar(enabled: bool = True) -> Iterator[Progress | _Silent]:
    """A Rich progress display (bar, n/total, status, elapsed, ETA), or a no-op stand-in."""
    if not enabled:
        yield _Silent()
        return
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _StatusColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        transient=False,
    )
    with progress:
        yield progress
