"""Rules that turn numbers into published numbers, each pinned against an independent computation (a plain Python
loop, NumPy, ``torch.median``, a hand-written Benjamini-Hochberg) on inputs where the likely one-line slips give a
different answer: the first real token under left padding, the median convention, the bootstrap's resampling
range, WeMask's k where ``int`` and ``round`` differ, the BH mapping back to its own rows, the sink threshold at
equality and the weights rule's emergence and persistence on one path. No model: each example runs in microseconds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from melayer.analysis.criterion import Criterion
from melayer.analysis.sinks import SinkResult
from melayer.analysis.weights import path_me_layer
from melayer.capture import first_real, left_pad, position_ids
from melayer.capture.reduce import lower_median
from melayer.eval.stats import bootstrap_ci, paired_bootstrap
from melayer.interventions.wemask import mask_width
from melayer.sweeps.table import adjust

settings.register_profile("melayer", max_examples=60, deadline=None, derandomize=True)
settings.load_profile("melayer")

# rows of token ids, at least one of them non-empty; the batch is left-padded to the longest
token_rows = st.lists(st.lists(st.integers(3, 50), min_size=0, max_size=7), min_size=1, max_size=5).filter(
    lambda rows: any(rows))


# ------------------------------------------------------------------------------------------------
# capture: the first real token and the positions under left padding


@given(token_rows)
def test_first_real_is_the_first_unpadded_column(rows):
    """Against a plain loop over the mask: the first column holding a real token (0 for an all-pad row, which has
    none). 'Column 0' is wrong for every left-padded row."""
    batch = left_pad(rows, pad=2)
    mask = batch["attention_mask"]
    want = [next((j for j, v in enumerate(row) if v), 0) for row in mask.tolist()]
    assert first_real(mask).tolist() == want
    width = mask.shape[1]
    assert want == [width - len(r) if r else 0 for r in rows]  # left padding: the real tokens end the row


@given(token_rows)
def test_position_ids_count_real_tokens_from_zero(rows):
    """Against a loop: the j-th real token of a row has position j, whatever the padding before it."""
    mask = left_pad(rows, pad=2)["attention_mask"]
    got = position_ids(mask).tolist()
    for row, m in zip(got, mask.tolist()):
        real = [p for p, keep in zip(row, m) if keep]
        assert real == list(range(len(real)))


# ------------------------------------------------------------------------------------------------
# the streaming reduction's median convention


@given(st.lists(st.floats(-1e6, 1e6, allow_nan=False, width=32), min_size=1, max_size=40))
def test_lower_median_equals_torch_median_on_even_and_odd_counts(values):
    x = torch.tensor(values, dtype=torch.float32)
    assert lower_median(x) == float(torch.median(x))


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 10])
def test_lower_median_of_a_permuted_range(n):
    """1..n shuffled: torch.median (and so the scan) takes the lower middle value, (n + 1) // 2."""
    x = torch.randperm(n, generator=torch.Generator().manual_seed(n)).float() + 1
    assert lower_median(x) == float(torch.median(x)) == float((n + 1) // 2)


# ------------------------------------------------------------------------------------------------
# the bootstrap resamples every index


@given(st.integers(2, 9), st.data())
def test_bootstrap_resamples_reach_every_index(n, data):
    """A single 1 among zeros, at any index: some resamples draw it (P = 1 - (1 - 1/n)^n > 0.6 each), so the
    interval's upper end is above 0. A resampling range that misses an index leaves it at exactly 0."""
    i = data.draw(st.integers(0, n - 1))
    values = [0.0] * n
    values[i] = 1.0
    lo, hi = bootstrap_ci("mean", values, n_boot=200)
    assert lo == 0.0 and hi > 0.0
    d = paired_bootstrap("mean", [0.0] * n, values, n_boot=200)
    assert d["diff"] == pytest.approx(1 / n) and d["ci95"][1] > 0.0


# ------------------------------------------------------------------------------------------------
# WeMask's k


@pytest.mark.parametrize("rate, hidden", [(0.03, 64), (0.05, 64), (0.1, 64), (0.01, 640), (0.015, 100), (0.07, 100),
                                          (0.02, 576), (0.01, 2304), (0.99, 64), (1.0, 64), (0.0, 64)])
def test_wemask_k_is_the_floor_of_rate_times_hidden(rate, hidden):
    """k = floor(rate x hidden), computed in exact rationals: 0.03 x 64 = 1.92 -> 1 (round would give 2), 0.015 x
    100 = 1.5 -> 1, 0.02 x 576 = 11.52 -> 11."""
    from fractions import Fraction

    want = math.floor(Fraction(str(rate)) * hidden)
    assert mask_width(rate, hidden) == want


# ------------------------------------------------------------------------------------------------
# Benjamini-Hochberg, mapped back to the rows


def _bh_reference(p: list[float]) -> list[float]:
    """Benjamini & Hochberg (1995) adjusted p-values, by hand: p_(i) x m / i, made monotone from the largest
    down, capped at 1, returned in the input order."""
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    adj = [0.0] * m
    running = 1.0
    for rank in range(m, 0, -1):
        i = order[rank - 1]
        running = min(running, p[i] * m / rank)
        adj[i] = running
    return adj


@given(st.lists(st.one_of(st.none(), st.floats(1e-6, 1.0)), min_size=1, max_size=12))
def test_bh_p_values_land_on_their_own_rows(ps):
    rows = [{"id": i, "mcnemar_p": p} for i, p in enumerate(ps)]
    adjust(rows)
    tested = [i for i, p in enumerate(ps) if p is not None]
    want = _bh_reference([ps[i] for i in tested])
    for i, r in enumerate(rows):
        assert r["id"] == i
        if ps[i] is None:
            assert "p_bh" not in r
    assert [rows[i]["p_bh"] for i in tested] == pytest.approx(want, rel=1e-12)
    assert [rows[i]["significant_bh"] for i in tested] == [p <= 0.05 for p in [rows[i]["p_bh"] for i in tested]]


def test_bh_on_rows_whose_adjusted_order_differs_from_the_input_order():
    rows = [{"mcnemar_p": 0.04}, {"mcnemar_p": None}, {"mcnemar_p": 0.01}, {"mcnemar_p": 0.03}, {"mcnemar_p": 0.5}]
    adjust(rows)
    # sorted 0.01, 0.03, 0.04, 0.5 (m = 4): 0.04, min(0.06, 0.0533) = 0.0533, 0.0533, 0.5
    assert [r.get("p_bh") for r in rows] == pytest.approx([0.04 * 4 / 3, None, 0.04, 0.04 * 4 / 3, 0.5])
    assert [r.get("significant_bh") for r in rows] == [False, None, True, False, False]


# ------------------------------------------------------------------------------------------------
# the sink threshold: a score equal to epsilon is not a sink (Gu et al.: alpha > epsilon)


def test_sink_threshold_is_strict_at_equality():
    eps = 0.25  # exact in binary: the comparison meets equality exactly
    first = np.array([[[0.25, 0.5, 0.1, 0.25]], [[0.25, 0.25, 0.25, 0.75]]], dtype=np.float32)  # (prompts, layers, heads)
    massive = np.array([[[0.25, np.nan, 0.5, 0.2]], [[0.25, 0.25, 0.3, 0.25]]])
    r = SinkResult(model="m", epsilon=eps, max_tokens=None, n_prompts=2, tokens_per_prompt=[20, 20],
                   alpha_first=first, top_is_first=np.zeros_like(first, dtype=bool), alpha_massive=massive,
                   massive_positions=[0, 0])
    assert r.sink_rate == 2 / 8  # only 0.5 and 0.75 exceed 0.25
    assert r.layer_rate() == [2 / 8]
    assert r.sink_rate_massive == pytest.approx(2 / 7)  # 0.5 and 0.3 of the 7 measured scores
    assert r.first_sink_layer() is None  # 25 % < 50 %
    assert r.first_sink_layer_any() == 0  # mean over prompts: head 1 (0.375) and head 3 (0.5) exceed 0.25
    d = r.to_dict()
    assert d["sink_share_first"] == [[0.0, 0.5, 0.0, 0.5]]


# ------------------------------------------------------------------------------------------------
# the weights rule on one first-token path: emergence against the ordinary median, persistence against the own one


def _path_reference(a: np.ndarray, start: float, crit: Criterion) -> tuple[int, int] | None:
    """A plain-loop reading of the rule in melayer.analysis.weights (module docstring), on |x| per (layer, dim)."""
    n_layers, hidden = a.shape
    med = [float(np.median(a[i])) if hidden % 2 else float(np.sort(a[i])[hidden // 2 - 1]) for i in range(n_layers)]
    tops = [int(np.argmax(a[i])) for i in range(n_layers)]
    count = {d: tops.count(d) for d in set(tops)}
    dim = sorted(count, key=lambda d: (-count[d], -float(a[:, d].max()), d))[0]
    first = next((i for i in range(n_layers) if a[i, tops[i]] > crit.persist_ratio * med[i]), n_layers)
    ordinary = med[first - 1] if first > 0 else start
    for layer in range(n_layers):
        v = a[layer, dim]
        if not (v > max(crit.abs_min, crit.median_ratio * ordinary) and v > crit.persist_ratio * med[layer]):
            continue
        if dim not in np.argsort(-a[layer], kind="stable")[:4]:
            continue
        later = [a[i, dim] > crit.abs_min and a[i, dim] > crit.persist_ratio * med[i] for i in range(layer + 1, n_layers)]
        if not later or (later[0] and sum(later) >= crit.persist_frac * len(later)):
            return layer, dim
    return None


@given(st.integers(0, 2**31 - 1), st.integers(3, 8), st.sampled_from([5, 8, 9]))
def test_path_rule_against_a_loop(seed, n_layers, hidden):
    """Random paths with a planted value that grows, may dip (a precursor that fades, a remover) and persists."""
    g = np.random.default_rng(seed)
    a = g.random((n_layers, hidden)) * 2
    dim, born = int(g.integers(hidden)), int(g.integers(n_layers))
    a[born:, dim] = g.choice([50.0, 5e3, 5e4], size=n_layers - born)
    if g.random() < 0.5:  # a precursor on another dim that fades
        other = (dim + 1) % hidden
        a[: max(1, born), other] = 4e3
    r = path_me_layer(torch.tensor(a * g.choice([-1, 1], size=a.shape)), 0.5, Criterion())
    want = _path_reference(a, 0.5, Criterion())
    assert (None if r is None else (r["me_layer"], r["dim"])) == want


@pytest.mark.parametrize("column, want", [
    ([0.5, 700, 700, 30, 2e4, 2e4, 2e4, 2e4], 4),  # 700 is < 1000 x the ordinary median (~1): not yet massive
    ([0.5, 2, 3e3, 3e3, 3e3, 3e3, 3e3, 3e3], 2),  # massive from layer 2 on
    ([0.5, 2, 3e3, 3e3, 50, 50, 50, 50], None),  # falls below abs_min: does not persist
])
def test_path_rule_examples(column, want):
    a = np.ones((len(column), 9))
    a[:, 4] = column
    r = path_me_layer(torch.tensor(a), 1.0, Criterion())
    assert (None if r is None else r["me_layer"]) == want
