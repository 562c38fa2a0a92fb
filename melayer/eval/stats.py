"""Aggregation, bootstrap confidence intervals and paired tests for per-sample metrics.

A metric's per-sample value is either a number (``mean``, ``exp_neg_mean``) or a pair ``[num, den]``
(``ratio``: sum num / sum den, e.g. IFEval instruction-level accuracy; ``exp_ratio``: exp(sum num / sum den),
e.g. token-level perplexity from per-window NLL sums and token counts). Confidence intervals are percentile
bootstrap intervals over samples (numpy, fixed seed); paired intervals resample the same sample indices for both
runs. McNemar's exact test is a two-sided binomial test on the discordant pairs (scipy.stats.binomtest).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

import numpy as np

KINDS = ("mean", "ratio", "exp_ratio", "exp_neg_mean")
N_BOOT = 2000
SEED = 0
_CHUNK = 250


@dataclass(frozen=True)
class Metric:
    """How a per-sample metric aggregates."""

    name: str
    kind: str = "mean"
    binary: bool = False  # per-sample 0/1 (McNemar applies)
    higher_is_better: bool = True

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown metric kind {self.kind!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "binary": self.binary, "higher_is_better": self.higher_is_better}


def as_array(kind: str, values: Sequence[Any]) -> np.ndarray:
    """(n,) for scalar kinds, (n, 2) for ratio kinds."""
    arr = np.asarray(values, dtype=np.float64)
    if kind in ("ratio", "exp_ratio"):
        if arr.ndim != 2 or arr.shape[1] != 2:
            raise ValueError(f"{kind} metric needs [num, den] pairs per sample")
    elif arr.ndim != 1:
        raise ValueError(f"{kind} metric needs one number per sample")
    return arr


def _agg_indexed(kind: str, arr: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Aggregate over the last axis of ``idx`` (rows of ``idx`` are resamples)."""
    if kind == "mean":
        return arr[idx].mean(axis=-1)
    if kind == "exp_neg_mean":
        return np.exp(-arr[idx].mean(axis=-1))
    num = arr[:, 0][idx].sum(axis=-1)
    den = arr[:, 1][idx].sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = num / den
    return np.exp(ratio) if kind == "exp_ratio" else ratio


def aggregate(kind: str, values: Sequence[Any]) -> float:
    arr = as_array(kind, values)
    if len(arr) == 0:
        return float("nan")
    return float(_agg_indexed(kind, arr, np.arange(len(arr))))


def _resamples(n: int, n_boot: int, seed: int):
    rng = np.random.default_rng(seed)
    done = 0
    while done < n_boot:
        m = min(_CHUNK, n_boot - done)
        yield rng.integers(0, n, size=(m, n))
        done += m


def bootstrap_ci(kind: str, values: Sequence[Any], n_boot: int = N_BOOT, seed: int = SEED,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of the aggregate (nan, nan when fewer than 2 samples)."""
    arr = as_array(kind, values)
    if len(arr) < 2:
        return float("nan"), float("nan")
    stats = np.concatenate([_agg_indexed(kind, arr, idx) for idx in _resamples(len(arr), n_boot, seed)])
    lo, hi = np.nanpercentile(stats, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(lo), float(hi)


class PairedDifference(TypedDict):
    """A paired difference (``compare.json``'s ``vs_baseline``) and its percentile-bootstrap interval."""

    diff: float
    ci95: list[float]


def paired_bootstrap(kind: str, base: Sequence[Any], new: Sequence[Any], n_boot: int = N_BOOT, seed: int = SEED,
                     level: float = 0.95) -> PairedDifference:
    """Difference ``agg(new) - agg(base)`` over the same samples, with a paired percentile bootstrap CI."""
    a, b = as_array(kind, base), as_array(kind, new)
    if len(a) != len(b):
        raise ValueError("paired samples must have the same length")
    diff = aggregate(kind, new) - aggregate(kind, base)
    if len(a) < 2:
        return {"diff": diff, "ci95": [float("nan"), float("nan")]}
    chunks = []
    for idx in _resamples(len(a), n_boot, seed):
        chunks.append(_agg_indexed(kind, b, idx) - _agg_indexed(kind, a, idx))
    lo, hi = np.nanpercentile(np.concatenate(chunks), [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return {"diff": float(diff), "ci95": [float(lo), float(hi)]}


def outcomes(kind: str, values: Sequence[Any]) -> list[float]:
    """The 0/1 outcomes of a binary metric: the values of a ``mean`` metric; for a ``ratio`` metric that is a rate
    over a subset (``[0 or 1, 1]`` inside it, ``[0, 0]`` outside), the numerators of the samples inside it."""
    if kind == "ratio":
        return [float(num) for num, den in values if den > 0]
    return [float(v) for v in values]


def mcnemar(base: Sequence[float], new: Sequence[float]) -> dict[str, Any]:
    """McNemar's exact test for paired 0/1 outcomes: two-sided binomial test on the discordant pairs."""
    from scipy.stats import binomtest

    a = np.asarray(base, dtype=np.float64) > 0.5
    b = np.asarray(new, dtype=np.float64) > 0.5
    if a.shape != b.shape:
        raise ValueError("paired samples must have the same length")
    gained = int(np.sum(~a & b))  # wrong at baseline, right with the intervention
    lost = int(np.sum(a & ~b))
    n = gained + lost
    p = 1.0 if n == 0 else float(binomtest(gained, n, 0.5, alternative="two-sided").pvalue)
    return {"gained": gained, "lost": lost, "discordant": n, "p": p}
