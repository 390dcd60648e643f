"""The progress bar of the commands that analyse (``analyze``, ``diff``): rich, transient, driven by the
``progress(done, total, what)`` callback that ``analyze_full`` and ``diff`` call."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


@contextmanager
def progress_bar(console: Console, start: str, verb: str) -> Iterator[Callable[[int, int, str], None]]:
    """A bar reading ``start`` until the first call, then "<verb> <what>" with done of total."""
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task(start, total=None)

        def progress(done: int, total: int, what: str) -> None:
            bar.update(task, completed=done, total=total, description=f"{verb} {what}")

        yield progress
