"""One rich progress bar for every long loop (evaluate, predict ...)."""

from __future__ import annotations


def progress_bar(
    *, enabled: bool = True, console=None, transient: bool = False, rate: bool = False
):
    """A ``rich.progress.Progress``: description, bar, done/total, percent, [rate,] elapsed and
    remaining time. ``rate=True`` shows a task field ``rate`` (e.g. ``"12.3 img/s"``); the
    default console is stderr, so a command's stdout stays clean."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TaskProgressColumn()]
    if rate:
        columns.append(TextColumn("{task.fields[rate]}"))
    columns += [TimeElapsedColumn(), TimeRemainingColumn()]
    return Progress(
        *columns,
        console=console or Console(stderr=True),
        disable=not enabled,
        transient=transient,
    )
