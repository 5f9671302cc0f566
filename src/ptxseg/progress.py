"""Progress output: one rich progress bar for every long loop (evaluate, predict ...) on a
terminal, and plain lines (:func:`log_line`) where stderr is a log file or a pipe, so that
``ptxseg train ... 2> train.log`` shows each stage and epoch as it happens."""

from __future__ import annotations

import sys


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


def stderr_is_terminal() -> bool:
    """Whether stderr is an interactive terminal (progress bars) or a file/pipe (lines)."""
    isatty = getattr(sys.stderr, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def log_line(text: str) -> None:
    """One plain line on stderr, flushed at once (no markup, no wrapping)."""
    print(text, file=sys.stderr, flush=True)


def plural(n: int, word: str, many: str | None = None) -> str:
    """``"1 epoch"``, ``"3 epochs"`` (``many``: an irregular plural)."""
    return f"{n} {word if n == 1 else (many or word + 's')}"


def duration(seconds: float) -> str:
    """``"42 s"``, ``"3 min 05 s"``, ``"2 h 07 min"``."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"
