"""The one protocol every result object follows: a kind, a versioned JSON schema, and a way back.

A result is a dataclass that mixes in :class:`Result` and sets ``kind`` (``"scan"``, ``"sinks"``, ...); its
``to_dict()`` is exactly what ``<kind>.json`` holds (``"schema": "melayer.<kind>/<version>"``) and
``from_dict()`` rebuilds an equal object from it, so ``Result.load(path)`` reads a file a command wrote::

    result = melayer.ScanResult.load("out/scan/scan.json")
    assert result.to_dict() == json.load(open("out/scan/scan.json"))   # up to JSON's NaN -> null

:func:`melayer.read` picks the class from the file's schema.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from melayer.util.display import HtmlRepr
from melayer.util.errors import MelayerError

R = TypeVar("R", bound="Result")


def schema_kind(data: Any, where: str) -> tuple[str, int]:
    """(kind, version) of a melayer JSON output; a one-line :class:`MelayerError` when it is not one."""
    schema = data.get("schema") if isinstance(data, dict) else None
    if not isinstance(schema, str):
        raise MelayerError(f"{where}: not a melayer output (no \"schema\" key)")
    name, _, version = schema.partition("/")
    if not name.startswith("melayer.") or not version.isdigit():
        raise MelayerError(f"{where}: not a melayer output (schema {schema!r})")
    return name.removeprefix("melayer."), int(version)


def read_json(path: str | Path) -> dict[str, Any]:
    """A JSON file's object, or a one-line :class:`MelayerError` (unreadable, not JSON, not an object)."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise MelayerError(f"{p}: cannot read ({getattr(exc, 'strerror', None) or exc})") from None
    except json.JSONDecodeError as exc:
        raise MelayerError(f"{p}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(data, dict):
        raise MelayerError(f"{p}: not a melayer output (not a JSON object)")
    return data


class Result(HtmlRepr):
    """Mixin of every result class: ``kind``, ``schema``, ``to_dict`` / ``from_dict``, ``load`` / ``save``."""

    kind: ClassVar[str]
    version: ClassVar[int] = 1

    @classmethod
    def schema(cls) -> str:
        """The schema tag this class writes and reads.

        Returns:
            ``"melayer.<kind>/<version>"``, e.g. ``"melayer.scan/1"``.
        """
        return f"melayer.{cls.kind}/{cls.version}"

    def to_dict(self) -> dict[str, Any]:
        """The result as plain JSON-ready data.

        Returns:
            Exactly what ``<kind>.json`` holds, ``"schema"`` included.
        """
        raise NotImplementedError

    @classmethod
    def from_dict(cls: type[R], data: dict[str, Any]) -> R:
        """Rebuild the result from what :meth:`to_dict` returned.

        Args:
            data: the dict :meth:`to_dict` wrote (e.g. a loaded ``<kind>.json``).

        Returns:
            A result equal to the one that wrote ``data``.
        """
        raise NotImplementedError

    @classmethod
    def check(cls, data: Any, where: str = "result") -> dict[str, Any]:
        """Check that ``data`` holds this kind of result at this schema version.

        Args:
            data: a loaded JSON object.
            where: what to name in the error (a file name).

        Returns:
            ``data`` itself.

        Raises:
            MelayerError: not a melayer output, another kind, or a schema version this melayer does not read.
        """
        kind, version = schema_kind(data, where)
        if kind != cls.kind:
            raise MelayerError(f"{where}: holds a {kind!r} result, not {cls.kind!r}")
        if version != cls.version:
            raise MelayerError(f"{where}: schema {data['schema']!r} has a version this melayer does not read "
                               f"(expected {cls.schema()!r})")
        return data

    @classmethod
    def load(cls: type[R], path: str | Path) -> R:
        """Read a JSON file this kind of result was saved to back into the result object.

        Args:
            path: the file (``<kind>.json`` in a command's output directory, or what :meth:`save` wrote).

        Returns:
            The result object.

        Raises:
            MelayerError: the file is unreadable, not this kind, or lacks fields it needs.
        """
        data = cls.check(read_json(path), str(path))
        try:
            return cls.from_dict(data)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise MelayerError(f"{path}: a {cls.kind} result without the fields it needs to load "
                               f"({type(exc).__name__}: {exc}); it was written by another melayer version") from None

    def save(self, path: str | Path) -> Path:
        """Write ``to_dict()`` to a JSON file, atomically (a reader never sees half a file).

        Args:
            path: the file to write.

        Returns:
            The path written.
        """
        from melayer.util.io import write_json

        return write_json(path, self.to_dict())
