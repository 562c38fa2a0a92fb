"""Every public function and method of the documented API has a Google-style docstring that the API reference can
render: an Args section naming each parameter (when it takes any) and a Returns (or Yields) section (when it
returns something other than None).

The documented API is the package root's names (``melayer.__all__``, resolved through its lazy table) and every
object the API reference (docs/reference.md, ``::: path``) renders, with the public methods of each class and the
constructor of a class that defines its own ``__init__`` (dataclasses' generated constructors are left out).
Docstrings are parsed by griffe, the parser mkdocstrings uses, so a section it would not render does not count.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
griffe = pytest.importorskip("griffe", reason="the docs extra is not installed (pip install -e '.[docs]')")

NO_VALUE = {"None", "NoReturn", "Never"}


def _documented_paths() -> list[str]:
    import melayer

    paths = {f"{module}.{attr}" for module, attr in melayer._LAZY.values()}
    paths |= {f"{getattr(melayer, n).__module__}.{n}" for n in melayer.__all__ if n not in melayer._LAZY}  # errors
    reference = (ROOT / "docs/reference.md").read_text()
    paths |= set(re.findall(r"^::: ([\w.]+)", reference, re.M))
    return sorted(paths)


@pytest.fixture(scope="module")
def package():
    logging.getLogger("griffe").setLevel(logging.ERROR)
    return griffe.load("melayer", search_paths=[str(ROOT)], docstring_parser="google", resolve_aliases=False)


def _get(package, path: str):
    obj = package
    for part in path.split(".")[1:]:
        obj = obj.members[part]
        if obj.is_alias:
            obj = obj.final_target
    return obj


def _problems(fn, where: str, constructor_doc=None) -> list[str]:
    docs = [d for d in (constructor_doc, fn.docstring) if d is not None]
    if not docs:
        return [f"{where}: no docstring"]
    sections = [s for d in docs for s in d.parse("google")]
    kinds = {s.kind.value for s in sections}
    out = []
    params = [p.name for p in fn.parameters if p.name not in ("self", "cls")]
    if params:
        documented = {p.name.lstrip("*") for s in sections if s.kind.value == "parameters" for p in s.value}
        missing = [p for p in params if p not in documented]
        # **kwargs may be documented key by key instead (names the signature does not have)
        kwargs = [p.name for p in fn.parameters if p.kind.value == "variadic keyword"]
        if kwargs and documented - set(params):
            missing = [p for p in missing if p not in kwargs]
        if "parameters" not in kinds:
            out.append(f"{where}: no Args section ({', '.join(params)})")
        elif missing:
            out.append(f"{where}: Args does not name {', '.join(missing)}")
    returns = None if fn.returns is None else str(fn.returns)
    if fn.name != "__init__" and returns not in NO_VALUE and not {"returns", "yields"} & kinds:
        out.append(f"{where}: no Returns section (-> {returns})")
    return out


def test_every_documented_function_has_args_and_returns(package):
    problems, checked = [], 0
    for path in _documented_paths():
        obj = _get(package, path)
        if obj.is_function:
            problems += _problems(obj, path)
            checked += 1
        elif obj.is_class:
            for name, member in obj.members.items():
                if member.is_alias:
                    continue  # imported into the class body, documented where it is defined
                if not member.is_function or "property" in member.labels:
                    continue
                if name == "__init__":
                    if "dataclass" not in obj.labels:
                        problems += _problems(member, f"{path}()", constructor_doc=obj.docstring)
                        checked += 1
                elif not name.startswith("_"):
                    problems += _problems(member, f"{path}.{name}")
                    checked += 1
    assert checked > 80, checked
    assert problems == [], "\n".join(problems)


def test_the_check_reads_sections_as_the_reference_renders_them():
    """A docstring with the sections passes, and one without them, or with an Args section that leaves a parameter
    out, fails: the check is not vacuous."""
    module = griffe.visit("m", filepath=Path("m.py"), docstring_parser="google", code='''
def good(a: int, *, b: str = "x") -> int:
    """Add.

    Args:
        a: the number.
        b: a label.

    Returns:
        The number.
    """

def bad(a: int, b: int) -> int:
    """Add.

    Args:
        a: the number.
    """

def keyed(a: int, **options) -> None:
    """Options documented one by one.

    Args:
        a: the number.
        dtype: one of the options.
    """

def loose(a: int, **options) -> None:
    """Options not documented.

    Args:
        a: the number.
    """

def quiet(a: int) -> None:
    """Nothing back.

    Args:
        a: the number.
    """
''')
    assert _problems(module["good"], "good") == []
    assert _problems(module["quiet"], "quiet") == []
    assert _problems(module["keyed"], "keyed") == []
    assert _problems(module["loose"], "loose") == ["loose: Args does not name options"]
    assert _problems(module["bad"], "bad") == ["bad: Args does not name b", "bad: no Returns section (-> int)"]
