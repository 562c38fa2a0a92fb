"""Shared helpers for the bench/ scripts: thread pinning, prompt sets, interleaved timing, the bare forward,
TransformerLens (optional), and markdown tables.

Import this module before torch: it pins OMP/MKL threads (``--threads``, default 1) through the environment.
Only ratios measured in one process, with the conditions interleaved, are meaningful on a shared machine.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def pin_threads(argv: Sequence[str] | None = None) -> int:
    """Read ``--threads N`` (default 1) from argv and pin every thread pool to it before torch is imported."""
    argv = list(sys.argv if argv is None else argv)
    n = 1
    for i, a in enumerate(argv):
        if a == "--threads" and i + 1 < len(argv):
            n = int(argv[i + 1])
        elif a.startswith("--threads="):
            n = int(a.split("=", 1)[1])
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)
    import torch

    torch.set_num_threads(n)
    return n


# ----------------------------------------------------------------------------------------------------
# prompt sets


def wikitext_path() -> Path:
    """The full WikiText-2 test file if present (``$MELAYER_WIKITEXT``, ``shared/data`` beside the repo or under
    /work), else the excerpt melayer ships (51 lines, ~2.7k tokens)."""
    candidates = [os.environ.get("MELAYER_WIKITEXT", ""), ROOT.parent / "shared/data/wikitext2/wiki.test.raw",
                  ROOT / "shared/data/wikitext2/wiki.test.raw", "/work/shared/data/wikitext2/wiki.test.raw"]
    for c in candidates:
        if c and Path(c).is_file():
            return Path(c)
    return ROOT / "melayer/data/ppl_text.txt"


def _paragraphs(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines()
            if line.strip() and not line.strip().startswith("=")]


def wiki_paragraphs(tokenizer: Any, n: int = 8, min_tokens: int = 300, max_tokens: int = 4096) -> list[str]:
    """The first ``n`` WikiText-2 paragraphs (file order) of ``min_tokens``-``max_tokens`` tokens."""
    out = []
    for p in _paragraphs(wikitext_path()):
        if min_tokens <= len(tokenizer(p)["input_ids"]) <= max_tokens:
            out.append(p)
            if len(out) == n:
                break
    return out


def wiki_long(tokenizer: Any, lengths: Sequence[int]) -> list[str]:
    """Running WikiText-2 text cut to about ``lengths`` tokens each (consecutive paragraphs; decoded from the
    token cut, so the re-tokenised length can differ by a token or two)."""
    text = "\n".join(_paragraphs(wikitext_path()))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    out, start = [], 0
    for n in lengths:
        if start + n > len(ids):
            start = 0
        if n > len(ids):
            raise SystemExit(f"bench: {wikitext_path()} holds only {len(ids)} tokens, fewer than {n}")
        out.append(tokenizer.decode(ids[start: start + n - 1]))  # -1: room for BOS
        start += n
    return out


def n_tokens(tokenizer: Any, texts: Sequence[str]) -> list[int]:
    return [len(tokenizer(t)["input_ids"]) for t in texts]


# ----------------------------------------------------------------------------------------------------
# the bare forward (written here on purpose: it must not use anything melayer adds)


def encode_rows(lm: Any, texts: Sequence[str]) -> list[dict[str, Any]]:
    """Each prompt alone (no padding)."""
    return [{k: v for k, v in lm.tokenizer([t], return_tensors="pt").items() if k in ("input_ids", "attention_mask")}
            for t in texts]


def encode_padded(lm: Any, texts: Sequence[str], batch_size: int) -> list[dict[str, Any]]:
    """Batches of ``batch_size`` prompts in input order, left padded."""
    tok = lm.tokenizer
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    side, tok.padding_side = tok.padding_side, "left"
    try:
        out = []
        for i in range(0, len(texts), batch_size):
            b = tok(list(texts[i: i + batch_size]), return_tensors="pt", padding=True)
            out.append({k: v for k, v in b.items() if k in ("input_ids", "attention_mask")})
        return out
    finally:
        tok.padding_side = side


def bare_forward(lm: Any, batches: Sequence[dict[str, Any]]) -> None:
    """The decoder stack alone (no LM head, no hidden-state outputs, no KV cache, no hooks)."""
    import torch

    from melayer.capture import position_ids

    with torch.no_grad():
        for b in batches:
            mask = b["attention_mask"]
            lm.body(input_ids=b["input_ids"].to(lm.device), attention_mask=mask.to(lm.device),
                    position_ids=position_ids(mask).to(lm.device), use_cache=False)


# ----------------------------------------------------------------------------------------------------
# TransformerLens (optional)


def transformer_lens(source: str) -> tuple[Any, str]:
    """A TransformerLens bridge over the same HF directory, or (None, why not).

    TransformerLens is a test dependency, not a melayer one: ``make setup`` installs it into the venv (pinned,
    ``--no-deps``; see the Makefile), where this finds it. ``$MELAYER_BENCH_TL`` still points at another install,
    e.g. one made aside with ``pip install --no-deps --target DIR transformer_lens==4.3.0 beartype einops
    fancy_einsum jaxtyping typeguard wadler_lindig``; it is searched first.
    """
    site = os.environ.get("MELAYER_BENCH_TL")
    if site and site not in sys.path:
        sys.path.insert(0, site)
    try:
        import transformer_lens  # noqa: F401
        from transformer_lens.model_bridge import TransformerBridge
        from transformers import AutoTokenizer
    except ImportError as exc:
        return None, (f"TransformerLens not importable ({exc}); run `make setup` (installs it into the venv) or set "
                      "MELAYER_BENCH_TL to a --target install")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    # its own HF model (it switches attention to eager, which must not leak into melayer's model)
    bridge = TransformerBridge.boot_transformers(source, tokenizer=AutoTokenizer.from_pretrained(source), device="cpu")
    return bridge, f"TransformerLens {_version('transformer_lens')}"


def tl_resid_scan(bridge: Any, rows: Sequence[dict[str, Any]]) -> None:
    """``run_with_cache`` keeping only ``hook_resid_post`` of every block, then the per-token max |a| of each
    (the least a massive-activation scan needs), one call per row of ``rows``: single prompts, or left-padded
    batches (their attention mask and positions passed on, as :func:`bare_forward` does)."""
    import torch

    from melayer.capture import position_ids

    with torch.no_grad():
        for b in rows:
            kw = {}
            if "attention_mask" in b and not bool(b["attention_mask"].all()):
                mask = b["attention_mask"]
                kw = {"attention_mask": mask, "position_ids": position_ids(mask)}
            _, cache = bridge.run_with_cache(b["input_ids"], names_filter=lambda n: n.endswith("hook_resid_post"),
                                             **kw)
            for v in cache.values():
                v.abs().amax(-1)
            del cache


# ----------------------------------------------------------------------------------------------------
# timing


def interleaved(fns: dict[str, Callable[[], Any]], reps: int, log: Callable[[str], None] | None = None,
                warmup: bool = True) -> dict[str, list[float]]:
    """Run every function ``reps`` times, interleaved (the order rotates each round); seconds per call."""
    names = list(fns)
    if warmup:
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
        if log:
            log(f"round {r + 1}/{reps}: " + ", ".join(f"{n} {times[n][-1]:.2f}s" for n in names))
    return times


def med(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def command_line() -> str:
    return f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')} .venv/bin/python " + " ".join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"
