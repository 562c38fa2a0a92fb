"""Atomic file writes: a reader never sees a half-written result, and every file gets the user's umask."""

from __future__ import annotations

import errno
import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from melayer.util.errors import MelayerError


def _clean(obj: Any) -> Any:
    """Make a result JSON-safe: NaN/inf become null (JSON has no such numbers)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return _clean(obj.item())
    return obj


def umask() -> int:
    """The process's umask (read without changing it where Linux allows)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str | Path) -> None:
    """Give ``path`` (and, for a directory, everything below it) the modes a plain ``open``/``mkdir`` would have:
    files 0666 and directories 0777 minus the umask. ``tempfile`` creates 0600 files and 0700 directories, which
    would leave a shared cache or results directory unreadable to the rest of a team."""
    mask = umask()
    path = Path(path)
    items = [path, *path.rglob("*")] if path.is_dir() else [path]
    for item in items:
        if item.is_symlink():
            continue
        os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~mask)


# a full disk, a file-size limit, a quota, a read-only file system, no permission: the user's environment, not a bug
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


def disk_error(path: str | Path, exc: OSError) -> MelayerError:
    """One line for an I/O error the user can fix (see :data:`DISK_ERRNOS`)."""
    return MelayerError(f"cannot write {path}: {exc.strerror or exc} (nothing was left half-written)")


def write_atomic(path: str | Path, writer: Callable[[Path], None]) -> Path:
    """Call ``writer(tmp_path)`` then rename over ``path`` in one step (the file gets the umask's mode). A full
    disk, a read-only file system and the like raise a one-line :class:`MelayerError`; ``path`` is then as it
    was before (the temporary file is removed)."""
    path = Path(path)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
        os.close(fd)
        writer(Path(tmp))
        apply_umask(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if exc.errno in DISK_ERRNOS:
            raise disk_error(path, exc) from None
        raise
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | Path, data: Any) -> Path:
    text = json.dumps(_clean(data), indent=1, allow_nan=False)
    return write_atomic(path, lambda p: p.write_text(text + "\n"))


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """Append one record and flush it to disk (resumable per-sample logs). All or nothing: if the write fails
    (full disk, Ctrl-C mid-write), the file is cut back to its previous length, so it never ends in a torn
    line; a full disk and the like raise a one-line :class:`MelayerError`."""
    line = (json.dumps(_clean(record)) + "\n").encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    except OSError as exc:
        if exc.errno in DISK_ERRNOS:
            raise disk_error(path, exc) from None
        raise
    try:
        start = os.fstat(fd).st_size
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except BaseException as exc:
            os.ftruncate(fd, start)
            if isinstance(exc, OSError) and exc.errno in DISK_ERRNOS:
                raise disk_error(path, exc) from None
            raise
    finally:
        os.close(fd)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read records, ignoring a torn last line left by a killed run."""
    records = []
    p = Path(path)
    if not p.exists():
        return records
    for line in p.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records
