"""melayer's cache directory (``$MELAYER_CACHE``, default ``~/.cache/melayer``) and the lock that lets several
processes fill it at once."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("MELAYER_CACHE") or Path.home() / ".cache" / "melayer")


@contextlib.contextmanager
def cache_lock(target: Path) -> Iterator[None]:
    """Hold a file lock (``filelock``, in ``$MELAYER_CACHE/locks``) while ``target`` is being built in the cache, so
    several processes starting at once on an empty cache (a sweep's jobs on a fresh node) build it once: the
    others wait, then find it ready."""
    from filelock import FileLock, Timeout

    from melayer.util.console import status

    locks = cache_dir() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(locks / f"{target.parent.name}-{target.name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        with status(f"waiting for another melayer process that is preparing {target.name} ..."):
            lock.acquire()
    try:
        yield
    finally:
        lock.release()
