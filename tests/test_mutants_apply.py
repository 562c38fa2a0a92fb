"""`make mutate` (tools/mutants.py) plants each mutant by finding its original text in the package: a mutant whose
line was rewritten is reported `not found` and checks nothing. Every mutant must find its text exactly once, so
that the mutation check keeps covering the rule it names when the code around it changes."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _mutants():
    spec = importlib.util.spec_from_file_location("melayer_mutants", ROOT / "tools/mutants.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_every_mutant_finds_its_line_once():
    mutants = _mutants()
    misplaced = []
    for m in mutants.MUTANTS:
        path, count = mutants.locate(ROOT / "melayer", m.original)
        if count != 1 or path is None:
            misplaced.append(f"{m.name}: original text occurs {count} times in melayer/")
        elif m.original == m.mutant:
            misplaced.append(f"{m.name}: the mutant is the original")
    assert len(mutants.MUTANTS) >= 50
    assert misplaced == []
