"""WikiText-2 sliding-window perplexity."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from melayer.eval import data
from melayer.eval.stats import Metric
from melayer.eval.tasks.base import RunContext, Sample, Task, encode
from melayer.eval.tasks.options import PPL_STRIDE, PPL_WINDOW
from melayer.util.errors import MelayerError

if TYPE_CHECKING:
    from melayer.models.loading import LM


@dataclass
class WikiText2(Task):
    name: str = "ppl"
    family: str = "perplexity"
    description: str = "WikiText-2 raw test, sliding-window token-level perplexity"
    metrics: tuple[Metric, ...] = (Metric("ppl", kind="exp_ratio", higher_is_better=False),)
    _cache: dict[Any, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        w = int(self.options.setdefault("window", PPL_WINDOW.default))
        s = int(self.options.setdefault("stride", PPL_STRIDE.default))
        if w < 2 or not 1 <= s <= w - 1:
            raise MelayerError(f"ppl needs window >= 2 and 1 <= stride < window (got window {w}, stride {s})")

    def _tokens(self, lm: LM) -> tuple[list[int], list[int]]:
        key = id(lm.tokenizer)
        if key not in self._cache:
            from melayer.analysis.perplexity import special_prefix

            self._cache[key] = (encode(lm, data.wikitext2_test(), special=False), special_prefix(lm.tokenizer))
        return self._cache[key]

    def _load(self, lm: LM | None) -> list[Sample]:
        if lm is None:
            raise MelayerError("ppl windows depend on the tokenizer: load(limit, lm=...)")
        self._fit(lm)
        ids, prefix = self._tokens(lm)
        from melayer.analysis.perplexity import rolling_windows

        windows = rolling_windows(len(ids), window=self.options["window"], stride=self.options["stride"],
                                  prefix_len=len(prefix))
        return [Sample(f"ppl-w{k}", {"begin": w.begin, "end": w.end, "scored": w.scored})
                for k, w in enumerate(windows)]

    def _fit(self, lm: LM) -> None:
        """The default window shrinks to the model's positions (stride: half of it); a window the user chose
        that is longer is refused for learned positions (and warned about otherwise, when it runs)."""
        limit = lm.max_positions
        if limit is None or self.options["window"] <= limit:
            return
        if "window" in self.given:
            if lm.learned_positions:
                raise MelayerError(f"--window {self.options['window']} is longer than {lm.name}'s {limit} positions")
            return
        self.options["window"] = limit
        if self.options["stride"] >= limit:
            if "stride" in self.given:
                raise MelayerError(f"--stride {self.options['stride']} is not shorter than the window, which "
                                   f"{lm.name}'s {limit} positions limit to {limit}")
            self.options["stride"] = limit // 2

    def prompt_format(self, chat: bool) -> str:
        w, s = self.options["window"], self.options["stride"]
        return (f"wiki.test.raw as one string, tokenised once without special tokens; windows of {w} tokens "
                f"(incl. the tokenizer's special prefix, e.g. BOS, which starts every window) advancing by {s}; the first "
                f"window scores all its tokens (without a prefix all but the first), later windows only the tokens "
                f"no earlier window scored; ppl = exp(total NLL / scored tokens) (melayer.analysis.perplexity)")

    def sink_text(self, sample: Sample) -> str:
        return data.wikitext2_test()[:2000].strip()

    def size_hint(self, sample: Sample) -> int:
        return int(sample.doc["end"]) - int(sample.doc["begin"])  # the window's tokens

    def run_batch(self, lm: LM, samples: Sequence[Sample], ctx: RunContext) -> list[dict[str, Any]]:
        ids, prefix = self._tokens(lm)
        from melayer.analysis.perplexity import Window, window_rows
        from melayer.eval import engine as E

        rows = window_rows(ids, [Window(**s.doc) for s in samples], prefix)
        scores = E.score_tails(lm, rows, intervention=ctx.intervention)
        return [{"id": s.id, "metrics": {"ppl": [-ll, float(s.doc["scored"])]}, "tokens": s.doc["scored"]}
                for s, (ll, _) in zip(samples, scores)]
