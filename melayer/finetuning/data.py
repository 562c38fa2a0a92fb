"""Training data: the vendored GSM8K train split or a user's JSONL, formatted the way the trainer sees it.

* ``--data gsm8k``: ``melayer/data/finetune/gsm8k/train.jsonl.gz`` (MIT, see its NOTICE.md). SFT: the prompt is
  ``"Question: {question}\\nAnswer:"`` (the same text ``melayer eval --task gsm8k`` asks), the completion the
  reference solution with its ``<<...>>`` calculator annotations removed, ending in ``#### N``. DPO: chosen =
  that solution, rejected = the model's own wrong greedy answer (generated once, cached). GRPO: the prompt
  and the gold number, rewarded by strict numeric match (``melayer.eval.answers``).
* A JSONL file: ``prompt``/``completion`` (SFT), ``prompt``/``chosen``/``rejected`` (DPO), ``prompt``/``answer``
  (GRPO); GSM8K-style ``question``/``answer`` rows work for every method.
* With a chat template (used when the tokenizer has one, unless ``chat=False``) every example becomes a
  conversation (user prompt, assistant completion); TRL applies the template and trains on the completion only.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from melayer.models.chat import render_chat
from melayer.util.errors import MelayerError

COLUMNS = {"sft": ("prompt", "completion"), "dpo": ("prompt", "chosen", "rejected"), "grpo": ("prompt", "answer")}
_CALC = re.compile(r"<<[^<>]*>>")


def gsm8k_train_file() -> Path:
    path = Path(str(resources.files("melayer.data") / "finetune" / "gsm8k" / "train.jsonl.gz"))
    if not path.is_file():
        raise MelayerError(f"vendored training file missing: {path} (reinstall melayer)")
    return path


def gsm8k_prompt(question: str) -> str:
    """The prompt text of a GSM8K problem (the same as ``melayer eval --task gsm8k`` 0-shot)."""
    return f"Question: {question.strip()}\nAnswer:"


def gsm8k_solution(answer: str) -> str:
    """A GSM8K reference solution without calculator annotations: ``48/2 = <<48/2=24>>24`` -> ``48/2 = 24``."""
    return _CALC.sub("", answer).strip()


@dataclass
class TrainingData:
    """Rows in the trainer's format plus where they came from."""

    rows: list[dict[str, Any]]  # plain: prompt/completion... strings (+ gold for GRPO)
    source: str
    sha256: str  # of the data file's bytes (uncompressed for the vendored file)
    kind: str  # "gsm8k" or "jsonl"

    def to_dict(self) -> dict[str, Any]:
        examples = hashlib.sha256(json.dumps(self.rows, sort_keys=True).encode()).hexdigest()
        return {"source": self.source, "kind": self.kind, "file_sha256": self.sha256, "examples": len(self.rows),
                "examples_sha256": examples}


def _read_jsonl_bytes(raw: bytes, source: str) -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(raw.decode("utf-8", errors="strict").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise MelayerError(f"--data {source}: line {n} is not JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise MelayerError(f"--data {source}: line {n} is not a JSON object")
        rows.append(row)
    return rows


def load_records(data: str, method: str, limit: int | None = None) -> TrainingData:
    """Read and check the raw records (before any model is loaded). GSM8K-style rows keep question/answer."""
    if data == "gsm8k":
        raw = gzip.decompress(gsm8k_train_file().read_bytes())
        source, kind = "gsm8k (vendored train split, MIT)", "gsm8k"
    else:
        path = Path(data).expanduser()
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise MelayerError(f"--data {data}: cannot read ({exc.strerror})") from None
        source, kind = str(path), "jsonl"
    try:
        rows = _read_jsonl_bytes(raw, data)
    except UnicodeDecodeError:
        raise MelayerError(f"--data {data}: not UTF-8 text") from None
    if not rows:
        raise MelayerError(f"--data {data}: no examples (empty file)")
    gsm_style = all("question" in r and "answer" in r for r in rows)
    if not gsm_style:
        need = COLUMNS[method]
        for n, row in enumerate(rows, 1):
            missing = [c for c in need if c not in row]
            if missing:
                raise MelayerError(f"--data {data}: {method} needs columns {'/'.join(need)} (or question/answer); "
                                   f"example {n} lacks {', '.join(missing)}")
            bad = [c for c in need if not isinstance(row[c], str) or not row[c].strip()]
            if bad:
                raise MelayerError(f"--data {data}: example {n}: column {bad[0]!r} must be non-empty text")
    else:
        kind = "gsm8k"
    if limit is not None:
        rows = rows[:limit]
    return TrainingData(rows=rows, source=source, sha256=hashlib.sha256(raw).hexdigest(), kind=kind)


def plain_rows(data: TrainingData, method: str) -> list[dict[str, Any]]:
    """Rows as plain strings: SFT prompt/completion, DPO prompt/chosen(/rejected), GRPO prompt/gold."""
    from melayer.eval.answers import gsm8k_gold

    out = []
    for row in data.rows:
        if data.kind == "gsm8k":
            prompt, solution = gsm8k_prompt(row["question"]), gsm8k_solution(row["answer"])
            if method == "sft":
                out.append({"prompt": prompt, "completion": solution})
            elif method == "dpo":
                out.append({"prompt": prompt, "chosen": solution, "gold": gsm8k_gold(row["answer"])})
            else:
                out.append({"prompt": prompt, "gold": gsm8k_gold(row["answer"])})
        elif method == "grpo":
            gold = _gold(row["answer"])
            out.append({"prompt": row["prompt"], "gold": gold})
        else:
            out.append({c: row[c] for c in COLUMNS[method]})
    return out


def _gold(answer: str) -> str:
    from melayer.eval.answers import gsm8k_gold, normalize_number

    gold = gsm8k_gold(answer) if "####" in answer else normalize_number(answer)
    if gold is None:
        raise MelayerError(f"grpo: the answer {answer[:60]!r} is not a number (nor a solution ending in '#### N')")
    return gold


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def use_chat(tokenizer: Any, chat: bool | None) -> bool:
    if chat and not has_chat_template(tokenizer):
        raise MelayerError("--chat: the tokenizer has no chat template")
    return has_chat_template(tokenizer) if chat is None else bool(chat)


def trainer_rows(rows: list[dict[str, Any]], chat: bool) -> list[dict[str, Any]]:
    """Plain rows -> TRL's dataset rows: conversations when ``chat``; plain text otherwise (``gold`` kept)."""
    if not chat:  # plain text: the completion follows the prompt after one space
        return [{k: (" " + v.lstrip() if k in ("completion", "chosen", "rejected") else v) for k, v in r.items()}
                for r in rows]
    out = []
    for r in rows:
        new: dict[str, Any] = {"prompt": [{"role": "user", "content": r["prompt"]}]}
        for col in ("completion", "chosen", "rejected"):
            if col in r:
                new[col] = [{"role": "assistant", "content": r[col]}]
        if "gold" in r:
            new["gold"] = r["gold"]
        out.append(new)
    return out


def training_texts(tokenizer: Any, rows: list[dict[str, Any]], chat: bool, n: int = 16) -> list[str]:
    """The first ``n`` examples as the text the trainer tokenises (prompt + completion, chat template applied),
    without a leading BOS text the tokenizer adds itself (so encoding it gives the trainer's token ids)."""
    texts = []
    for r in rows[:n]:
        answer = r.get("completion", r.get("chosen", ""))
        if chat:
            msgs = [{"role": "user", "content": r["prompt"]}]
            if answer:
                msgs.append({"role": "assistant", "content": answer})
            text = render_chat(tokenizer, msgs, add_generation_prompt=not answer)
        else:
            text = r["prompt"] + (" " + answer.lstrip() if answer else "")
        bos = getattr(tokenizer, "bos_token", None)
        if bos and text.startswith(bos) and _adds_bos(tokenizer):
            text = text[len(bos):]
        texts.append(text)
    return texts


def _adds_bos(tokenizer: Any) -> bool:
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id
