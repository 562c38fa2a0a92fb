"""Console helpers: rich progress bars and spinners on stderr (stdout stays for results)."""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from rich.console import Console
from rich.markup import escape
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


# terminal controls (C0 but tab/newline, DEL, C1: ESC sequences can retitle, recolour or rewrite a terminal) and
# the Unicode bidirectional controls (an RTL override reverses the trusted text printed after it)
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def plain(text: str) -> str:
    """``text`` with every terminal control and bidirectional control shown as a visible ``\\uXXXX`` escape."""
    return _UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def map_strings(obj: Any, fn: Callable[[str], str], keys: bool = False) -> Any:
    """A copy of a JSON-like value (dicts, lists, tuples) with ``fn`` applied to every string value in it (and to
    the dict keys with ``keys``)."""
    if isinstance(obj, str):
        return fn(obj)
    if isinstance(obj, dict):
        return {(fn(k) if keys and isinstance(k, str) else k): map_strings(v, fn, keys) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_strings(v, fn, keys) for v in obj)
    return obj


def console_safe(obj: Any) -> Any:
    """A copy of a result for printing with rich: every string made :func:`plain` and its rich markup escaped
    (a model, token or task name is data, never markup: ``model[v2]`` prints as ``model[v2]``)."""
    return map_strings(obj, lambda s: escape(plain(s)))


_warned: set[str] = set()


def warn(message: str) -> None:
    """One ``melayer: warning: ...`` line on stderr, once per message and process."""
    if message not in _warned:
        _warned.add(message)
        print(f"melayer: warning: {plain(message)}", file=sys.stderr, flush=True)
