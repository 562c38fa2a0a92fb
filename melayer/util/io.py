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


MAX_JSON_DEPTH = 64  # melayer's own results nest a handful of levels; a deeper file is not one of them


def parse_json(text: str | bytes, where: str | Path) -> Any:
    """JSON from a file someone else may have written: a one-line :class:`MelayerError` when it is not valid JSON
    (or not UTF-8) or nests more than :data:`MAX_JSON_DEPTH` levels (Python's recursion limit is never reached
    by the code that walks it afterwards)."""
    try:
        data = json.loads(text)
    except RecursionError:
        raise MelayerError(f"{where}: JSON nested too deeply to be a melayer output") from None
    except json.JSONDecodeError as exc:
        raise MelayerError(f"{where}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    except UnicodeDecodeError:
        raise MelayerError(f"{where}: not a UTF-8 text file") from None
    stack = [(data, 1)]
    while stack:
        obj, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise MelayerError(f"{where}: JSON nested more than {MAX_JSON_DEPTH} levels deep; not a melayer output")
        if isinstance(obj, dict):
            stack.extend((v, depth + 1) for v in obj.values())
        elif isinstance(obj, list):
            stack.extend((v, depth + 1) for v in obj)
    return data


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


def write_atomic(path: str | Path, writer: Callable[[Path], object]) -> Path:
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
        # never through a symbolic link: a link planted in the output directory must not redirect the appends
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    except OSError as exc:
        if exc.errno in DISK_ERRNOS:
            raise disk_error(path, exc) from None
        if exc.errno == errno.ELOOP:
            raise MelayerError(f"{path} is a symbolic link; melayer appends only to a regular file it created: "
                               "remove the link") from None
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


def scan_jsonl(path: str | Path, require: str | None = None) -> tuple[list[dict[str, Any]], list[tuple[int, bytes]], bool]:
    """A JSON-lines file read line by line: (the records, the unreadable lines as (line number, raw bytes), whether
    the last line is torn). A line is unreadable when it is not UTF-8, not JSON, not a JSON object, or lacks the
    key ``require``; it never hides the lines after it. A torn last line (no newline: a run killed mid-write) is
    not a record and not an unreadable line."""
    p = Path(path)
    if not p.exists():
        return [], [], False
    raw = p.read_bytes()
    lines = raw.split(b"\n")
    torn = bool(lines[-1].strip())
    records, bad = [], []
    for n, line in enumerate(lines[:-1], 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            rec = None
        if isinstance(rec, dict) and (require is None or require in rec):
            records.append(rec)
        else:
            bad.append((n, line))
    return records, bad, torn


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read the records; unreadable lines (see :func:`scan_jsonl`) and a torn last line left by a killed run are
    skipped."""
    return scan_jsonl(path)[0]


MAX_PROMPT_CHARS = 65_536  # one prompt (about 16,000 tokens of English)
MAX_PROMPTS = 100_000  # prompts in one file
MAX_PROMPT_TEXT = 16 * 2**20  # characters over all the prompts of one file


def check_prompt_size(text: str, where: str = "a prompt") -> str:
    """``text`` if it is at most :data:`MAX_PROMPT_CHARS` characters long, else one error line."""
    if len(text) > MAX_PROMPT_CHARS:
        raise MelayerError(f"{where} has {len(text):,} characters; melayer takes prompts of at most "
                           f"{MAX_PROMPT_CHARS:,} characters")
    return text


def read_prompts(path: str, limit: int | None = None) -> list[str]:
    """The non-empty lines of a prompt file, in order (the first ``limit`` only, when given).

    The file is read a line at a time and never whole: a prompt longer than :data:`MAX_PROMPT_CHARS`
    characters, more than :data:`MAX_PROMPTS` prompts or more than :data:`MAX_PROMPT_TEXT` characters in all
    is one error line, found before anything is tokenised. Lines past ``limit`` prompts are not read.
    """
    p = Path(path)
    if not p.is_file():
        raise MelayerError(f"prompt file not found: {path}")
    prompts: list[str] = []
    total = lineno = 0
    try:
        with p.open(encoding="utf-8") as f:
            while limit is None or len(prompts) < limit:
                line = f.readline(MAX_PROMPT_CHARS + 1)
                if not line:
                    break
                lineno += 1
                if len(line) > MAX_PROMPT_CHARS and not line.endswith("\n"):
                    raise MelayerError(f"line {lineno} of {path} is longer than {MAX_PROMPT_CHARS:,} characters; "
                                       f"melayer takes prompts of at most {MAX_PROMPT_CHARS:,} characters")
                for text in line.splitlines():
                    if not text.strip():
                        continue
                    if len(prompts) == MAX_PROMPTS:
                        raise MelayerError(f"prompt file {path} holds more than {MAX_PROMPTS:,} prompts; melayer "
                                           f"reads at most {MAX_PROMPTS:,} from one file")
                    total += len(text)
                    if total > MAX_PROMPT_TEXT:
                        raise MelayerError(f"prompt file {path} holds more than {MAX_PROMPT_TEXT // 2**20} MiB of "
                                           f"prompt text; melayer reads at most {MAX_PROMPT_TEXT // 2**20} MiB from "
                                           "one file")
                    prompts.append(text)
    except (OSError, UnicodeDecodeError) as exc:
        raise MelayerError(f"cannot read prompt file {path}: {exc}") from None
    if not prompts:
        raise MelayerError(f"prompt file {path} holds no prompts")
    return prompts[:limit] if limit else prompts
