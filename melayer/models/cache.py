"""melayer's cache directory (``$MELAYER_CACHE``, default ``~/.cache/melayer``) and the lock that lets several
processes fill it at once."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("MELAYER_CACHE") or Path.home() / ".cache" / "melayer")


def drop_link(path: Path) -> bool:
    """Remove ``path`` if it is a symbolic link (the link only, never what it points to); whether it was one.

    melayer makes no links in its cache: one found where melayer keeps a file or a directory was planted there
    (or put by hand), so it is neither followed for writes nor trusted for reads."""
    if not path.is_symlink():
        return False
    path.unlink(missing_ok=True)
    return True


@contextlib.contextmanager
def cache_lock(target: Path) -> Iterator[None]:
    """Hold a file lock (``filelock``, in ``$MELAYER_CACHE/locks``) while ``target`` is being built in the cache, so
    several processes starting at once on an empty cache (a sweep's jobs on a fresh node) build it once: the
    others wait, then find it ready."""
    from filelock import FileLock, Timeout

    from melayer.util.console import status

    locks = cache_dir() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    path = locks / f"{target.parent.name}-{target.name}.lock"
    drop_link(path)  # filelock refuses to lock through a link, and melayer's locks are plain files
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        with status(f"waiting for another melayer process that is preparing {target.name} ..."):
            lock.acquire()
    try:
        yield
    finally:
        lock.release()
