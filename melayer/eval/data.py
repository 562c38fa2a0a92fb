"""The evaluation data vendored in ``melayer/data/eval`` (see its README.md / NOTICE.md files).

Nothing is ever downloaded: every task reads these files.
"""

from __future__ import annotations

import bz2
import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

from melayer.util.errors import MelayerError


def data_dir() -> Path:
    """``melayer/data/eval`` inside the installed package."""
    return Path(str(resources.files("melayer.data") / "eval"))


def data_file(task_dir: str, name: str) -> Path:
    path = data_dir() / task_dir / name
    if not path.is_file():
        raise MelayerError(f"vendored evaluation file missing: {path} (reinstall melayer)")
    return path


def ensure_nltk_data() -> str:
    """Append the vendored ``nltk_data`` (punkt_tab English) to NLTK's search path, before and after nltk is
    imported, so the IFEval checker never tries to download anything."""
    vendored = str(data_dir() / "nltk_data")
    current = [p for p in os.environ.get("NLTK_DATA", "").split(os.pathsep) if p]
    if vendored not in current:
        os.environ["NLTK_DATA"] = os.pathsep.join([*current, vendored])
    import sys

    nltk_data = sys.modules.get("nltk.data")
    if nltk_data is not None and vendored not in nltk_data.path:
        nltk_data.path.append(vendored)
    return vendored


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def gsm8k_test() -> list[dict[str, Any]]:
    return read_jsonl(data_file("gsm8k", "test.jsonl"))


def gsm8k_fewshot() -> list[dict[str, Any]]:
    return read_jsonl(data_file("gsm8k", "train_fewshot.jsonl"))


def math500() -> list[dict[str, Any]]:
    return read_jsonl(data_file("math500", "test.jsonl"))


def ifeval() -> list[dict[str, Any]]:
    return read_jsonl(data_file("ifeval", "input_data.jsonl"))


def arc(subset: str) -> list[dict[str, Any]]:
    name = {"easy": "ARC-Easy-Test.jsonl", "challenge": "ARC-Challenge-Test.jsonl"}[subset]
    return read_jsonl(data_file("arc", name))


def hellaswag() -> list[dict[str, Any]]:
    """10,042 items: 6 lines each (``activity_label: ctx``, gold label, 4 endings), already preprocessed."""
    text = bz2.decompress(data_file("hellaswag", "hellaswag_val_full.txt.bz2").read_bytes()).decode("utf-8")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise MelayerError(f"hellaswag data has {len(lines)} lines, not a multiple of 6")
    items = []
    for i in range(0, len(lines), 6):
        items.append({"ctx": lines[i], "label": int(lines[i + 1]), "endings": lines[i + 2: i + 6]})
    return items


def lambada() -> list[str]:
    with data_file("lambada", "lambada_test_plain_text.txt").open(encoding="utf-8") as fh:
        return [line.rstrip("\n").strip() for line in fh if line.strip()]


def winogrande() -> list[dict[str, Any]]:
    rows = read_jsonl(data_file("winogrande", "dev.jsonl"))
    labels = data_file("winogrande", "dev-labels.lst").read_text().split()
    if len(labels) != len(rows):
        raise MelayerError("winogrande: dev.jsonl and dev-labels.lst differ in length")
    for row, label in zip(rows, labels):
        if str(row.get("answer", label)) != label:
            raise MelayerError(f"winogrande: label mismatch for {row.get('qID')}")
    return rows


def wikitext2_test() -> str:
    return data_file("wikitext2", "wiki.test.raw").read_text(encoding="utf-8")


def _csv(path: Path) -> list[dict[str, str]]:
    import csv

    with path.open(encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def mmlu_groups() -> dict[str, str]:
    """The 57 MMLU subjects and their group (stem, humanities, social_sciences, other), as lm-eval tags them."""
    return json.loads(data_file("mmlu", "subjects.json").read_text(encoding="utf-8"))


def mmlu(subject: str, split: str) -> list[dict[str, Any]]:
    """One subject's ``test`` or ``dev`` rows: question, choices (4 texts), answer (0-based index)."""
    rows = _csv(data_file(f"mmlu/{split}", f"{subject}_{split}.csv"))
    return [{"subject": subject, "question": r["question"],
             "choices": [r["choice0"], r["choice1"], r["choice2"], r["choice3"]], "answer": int(r["answer"])}
            for r in rows]


def aime24() -> list[dict[str, Any]]:
    return read_jsonl(data_file("aime24", "test.jsonl"))


def xstest() -> list[dict[str, str]]:
    """450 prompts: id, prompt, type, label (safe/unsafe), focus, note."""
    return _csv(data_file("xstest", "xstest_prompts.csv"))
