"""The massive-activation criterion, stated in every output."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch


@dataclass(frozen=True)
class Criterion:
    """|a| > ``abs_min`` and |a| > ``median_ratio`` x median |a| of that layer's output (Sun et al. 2024).

    The ME layer is the first decoder layer holding a massive (token, dim) that *persists*: its |a|
    stays above ``abs_min`` and above ``persist_ratio`` x the layer median in the next layer and in at
    least ``persist_frac`` of all later layers. (The residual stream's median grows with depth, e.g.
    ~400x over Gemma-3-270M's 18 layers, so a value that stays put can fall below the 1000x emergence
    ratio late in the network while still being two orders of magnitude above everything else.)
    Massive values before the ME layer, or that never persist, are precursors. Prompts with fewer than
    ``min_tokens`` real tokens do not vote in the consensus (their median is not meaningful).

    Attributes:
        abs_min: the smallest |a| a massive value can have.
        median_ratio: how many times the layer's median |a| a value must exceed to emerge as massive.
        persist_ratio: how many times the layer's median |a| it must keep exceeding to persist.
        persist_frac: the share (0-1) of the later layers in which it must persist.
        min_tokens: prompts with fewer real tokens do not vote for the ME layer.
    """

    abs_min: float = 100.0
    median_ratio: float = 1000.0
    persist_ratio: float = 100.0
    persist_frac: float = 0.75
    min_tokens: int = 4

    def __post_init__(self) -> None:
        from melayer.util.errors import MelayerError

        checks = {
            "abs_min": self.abs_min >= 0,
            "median_ratio": self.median_ratio > 0,
            "persist_ratio": self.persist_ratio >= 0,
            "persist_frac": 0 < self.persist_frac <= 1,
            "min_tokens": self.min_tokens >= 1,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            values = ", ".join(f"{name}={getattr(self, name)!r}" for name in bad)
            raise MelayerError(f"invalid massive-activation criterion: {values} (need abs_min >= 0, median_ratio > 0, "
                               "persist_ratio >= 0, 0 < persist_frac <= 1, min_tokens >= 1)")

    def cutoff(self, median: torch.Tensor | float) -> float:
        """The magnitude above which an entry of a layer's output is massive.

        Args:
            median: the median |a| of that layer's output.

        Returns:
            ``max(abs_min, median_ratio x median)``.
        """
        return max(self.abs_min, self.median_ratio * float(median))

    def persists(self, value: float, median: float) -> bool:
        """Whether a massive entry persists at a later layer.

        Args:
            value: the entry at the later layer.
            median: the median |a| of that layer's output.

        Returns:
            True when |value| is above ``abs_min`` and above ``persist_ratio`` x ``median``.
        """
        return abs(value) > self.abs_min and abs(value) > self.persist_ratio * median

    def describe(self) -> str:
        """The criterion in words, as every output states it.

        Returns:
            One sentence naming every threshold.
        """
        return (
            f"|a| > {self.abs_min:g} and |a| > {self.median_ratio:g} x median|a| of the layer output; "
            f"ME layer = first layer with a massive (token, dim) that stays > {self.abs_min:g} and > "
            f"{self.persist_ratio:g} x median in the next layer and in >= {self.persist_frac:.0%} of later layers; "
            f"prompts < {self.min_tokens} tokens do not vote"
        )

    def to_dict(self) -> dict[str, object]:
        """The thresholds and the rule in words, as results store them.

        Returns:
            The fields plus ``"rule"`` (:meth:`describe`).
        """
        return {**asdict(self), "rule": self.describe()}

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Criterion:
        """The criterion :meth:`to_dict` describes (its ``rule`` text is derived and ignored).

        Args:
            data: what :meth:`to_dict` returned; missing thresholds take their defaults.

        Returns:
            The criterion.
        """
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})  # type: ignore[arg-type]
