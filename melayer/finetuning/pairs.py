"""DPO pairs built offline: chosen = the reference solution, rejected = the model's own wrong greedy answer.

The greedy answers are generated once per (model, data, settings) and cached under
``~/.cache/melayer/dpo/`` (``MELAYER_CACHE``); a filelock keeps two processes from writing the same file.
Problems the model already answers correctly (strict numeric match) give no pair.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from melayer.models.cache import cache_dir, cache_lock, drop_link
from melayer.models.loading import LM
from melayer.util.errors import MelayerError


def _cache_file(lm: LM, rows: list[dict[str, Any]], chat: bool, max_new_tokens: int) -> Path:
    key = json.dumps({"model": lm.name, "source": lm.source, "chat": chat, "max_new_tokens": max_new_tokens,
                      "prompts": [r["prompt"] for r in rows]}, sort_keys=True)
    return cache_dir() / "dpo" / f"rejected-{hashlib.sha256(key.encode()).hexdigest()[:20]}.jsonl"


def greedy_answers(lm: LM, rows: list[dict[str, Any]], chat: bool, max_new_tokens: int, batch_size: int = 8,
                   progress: bool = True) -> tuple[list[str], Path]:
    """The model's greedy answer to every prompt (cached). Returns (answers, cache file)."""
    from melayer.interventions.generate import greedy_generate
    from melayer.util.console import track
    from melayer.util.io import read_jsonl, write_atomic

    path = _cache_file(lm, rows, chat, max_new_tokens)
    path.parent.mkdir(parents=True, exist_ok=True)
    with cache_lock(path):
        cached = [] if drop_link(path) else read_jsonl(path)  # a link planted in the cache is not read
        if len(cached) == len(rows):
            return [c["answer"] for c in cached], path
        answers: list[str] = []
        starts = list(range(0, len(rows), batch_size))
        for start in track(starts, "generating rejected answers (once, cached)", enabled=progress):
            prompts = [r["prompt"] for r in rows[start:start + batch_size]]
            texts, _, _ = greedy_generate(lm, prompts, max_new_tokens=max_new_tokens, chat=chat)
            answers.extend(texts)
        lines = "".join(json.dumps({"prompt": r["prompt"], "answer": a}) + "\n" for r, a in zip(rows, answers))
        write_atomic(path, lambda p: p.write_text(lines))
    return answers, path


def dpo_pairs(lm: LM, rows: list[dict[str, Any]], chat: bool, max_new_tokens: int,
              progress: bool = True) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """GSM8K rows (prompt/chosen/gold) -> prompt/chosen/rejected pairs where the model's answer is wrong."""
    from melayer.eval.answers import gsm8k_score

    answers, path = greedy_answers(lm, rows, chat, max_new_tokens, progress=progress)
    pairs = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": a.strip() or "(no answer)"}
             for r, a in zip(rows, answers) if not gsm8k_score(a, r["gold"])["exact_match_strict"]]
    if not pairs:
        raise MelayerError("dpo: the model answered every problem correctly; no rejected answers to build pairs")
    info = {"rejected": "the model's own greedy answer (strict-wrong only)", "cache": str(path),
            "problems": len(rows), "pairs": len(pairs), "max_new_tokens": max_new_tokens}
    return pairs, info
