"""Console helpers: rich progress bars and spinners on stderr (stdout stays for results)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")
err = Console(stderr=True)
out = Console()


def _quiet() -> bool:
    return bool(os.environ.get("MELAYER_QUIET"))


def progress_bar(*extra: TextColumn) -> Progress:
    """melayer's progress bar on stderr: description, bar, n/total, elapsed, remaining (+ ``extra`` columns)."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), *extra, console=err)


def track(items: Iterable[T], description: str, total: int | None = None, enabled: bool = True,
          advance: Callable[[T], int] | None = None) -> Iterator[T]:
    """Iterate with a progress bar on stderr (disabled when quiet or not wanted); ``advance(item)`` says how many
    units of ``total`` an item counts for (default 1), e.g. the prompts in a batch."""
    if not enabled or _quiet():
        yield from items
        return
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with progress_bar() as progress:
        task = progress.add_task(description, total=total)
        for item in items:
            yield item
            progress.advance(task, advance(item) if advance is not None else 1)


@contextlib.contextmanager
def status(message: str | None) -> Iterator[None]:
    """A spinner for a single long step (no-op when message is None or quiet)."""
    if message is None or _quiet():
        yield
        return
    with err.status(message):
        yield


_warned: set[str] = set()


def warn(message: str) -> None:
    """One ``melayer: warning: ...`` line on stderr, once per message and process."""
    if message not in _warned:
        _warned.add(message)
        print(f"melayer: warning: {message}", file=sys.stderr, flush=True)
