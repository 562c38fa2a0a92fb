"""The API reference (docs/reference.md, rendered by mkdocstrings) documents what it shows: every function and
public method it lists has Args naming each parameter and Returns unless it returns None, and every field of a
dataclass it lists is described in the class's docstring."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
from pathlib import Path
from typing import Any

import pytest

REFERENCE = Path(__file__).resolve().parents[1] / "docs" / "reference.md"
ENTRIES = re.findall(r"^::: ([\w.]+)", REFERENCE.read_text(), re.M)
# melayer.finetune's options are FinetuneConfig's fields: documented once, in FinetuneConfig (checked below)
CONFIG_OPTIONS = {"melayer.finetuning.train.finetune": "melayer.finetuning.config.FinetuneConfig"}
# the architecture map: its fields are module paths of roles, one per role name; the roles are explained on the
# architectures page and by ArchSpec.path
FIELDS_DOCUMENTED_ELSEWHERE = {"melayer.models.archmap.ArchSpec"}


def resolve(dotted: str) -> Any:
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            obj = getattr(obj, name)
        return obj
    raise LookupError(dotted)


def functions(dotted: str) -> list[tuple[str, Any]]:
    """The functions an entry shows: itself, or a class's public methods (properties are attributes)."""
    obj = resolve(dotted)
    if not inspect.isclass(obj):
        return [(dotted, obj)]
    return [(f"{dotted}.{k}", getattr(v, "__func__", v)) for k, v in vars(obj).items()
            if not k.startswith("_") and inspect.isfunction(getattr(v, "__func__", v))]


def undocumented(qualname: str, fn: Any) -> list[str]:
    doc = inspect.getdoc(fn) or ""
    if not doc:
        return [f"{qualname}: no docstring"]
    sig = inspect.signature(fn)
    params = [p.name for p in sig.parameters.values() if p.name not in ("self", "cls")]
    if qualname in CONFIG_OPTIONS:
        config = resolve(CONFIG_OPTIONS[qualname])
        params = [p for p in params if p not in {f.name for f in dataclasses.fields(config)}]
    problems = []
    if params and "Args:" not in doc:
        problems.append(f"{qualname}: no Args section")
    args = doc.split("Args:", 1)[-1].split("Returns:")[0]
    problems += [f"{qualname}: parameter {p!r} not in Args" for p in params
                 if "Args:" in doc and not re.search(rf"(^|\s)\**{p}( \(|:)", args)]
    if sig.return_annotation not in (None, "None", inspect.Signature.empty) and not (
            "Returns:" in doc or "Yields:" in doc):
        problems.append(f"{qualname}: no Returns section")
    return problems


def test_the_reference_lists_the_root_verbs_objects():
    assert len(ENTRIES) >= 20 and len(set(ENTRIES)) == len(ENTRIES)


@pytest.mark.parametrize("entry", ENTRIES)
def test_every_function_in_the_reference_has_args_and_returns(entry):
    problems = [p for qual, fn in functions(entry) for p in undocumented(qual, fn)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("entry", [e for e in ENTRIES if dataclasses.is_dataclass(resolve(e))
                                   and e not in FIELDS_DOCUMENTED_ELSEWHERE])
def test_every_field_of_a_dataclass_in_the_reference_is_described(entry):
    cls = resolve(entry)
    doc = inspect.getdoc(cls) or ""
    described = doc.split("Attributes:", 1)[1] if "Attributes:" in doc else ""
    missing = [f.name for f in dataclasses.fields(cls) if not re.search(rf"^\s+{f.name}:", described, re.M)]
    assert not missing, f"{entry}: fields not described under Attributes: {missing}"


def test_the_checker_catches_an_undocumented_parameter_and_a_missing_returns():
    def f(a: int, b: int) -> int:
        """Add.

        Args:
            a: one number.
        """
        return a + b

    assert undocumented("f", f) == ["f: parameter 'b' not in Args", "f: no Returns section"]
