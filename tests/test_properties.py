"""Property-based tests (hypothesis) for the pure rules: the criterion, persistence / the ME layer, answer
extraction, the statistics and layer-list parsing. No model: each example runs in microseconds."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from melayer.analysis.criterion import Criterion
from melayer.analysis.scan import locate_me_layer
from melayer.eval import answers as A
from melayer.eval import stats
from melayer.interventions.wemask import format_layers, parse_layers

settings.register_profile("melayer", max_examples=60, deadline=None, derandomize=True)
settings.load_profile("melayer")

positive = st.floats(min_value=1e-3, max_value=1e6, allow_nan=False, allow_infinity=False)
values = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)

# ------------------------------------------------------------------------------------------------ criterion


@given(abs_min=st.floats(0, 1e4), ratio=st.floats(1e-3, 1e4), median=st.floats(0, 1e4))
def test_cutoff_is_the_larger_of_the_two_bars(abs_min, ratio, median):
    c = Criterion(abs_min=abs_min, median_ratio=ratio)
    assert c.cutoff(median) == max(abs_min, ratio * median)


@given(value=values, median=st.floats(0, 1e4), abs_min=st.floats(0, 1e4), ratio=st.floats(0, 1e4))
def test_persists_is_symmetric_in_sign_and_means_above_both_bars(value, median, abs_min, ratio):
    c = Criterion(abs_min=abs_min, persist_ratio=ratio)
    assert c.persists(value, median) == c.persists(-value, median)
    assert c.persists(value, median) == (abs(value) > abs_min and abs(value) > ratio * median)


# ------------------------------------------------------------------------------------------------ ME layer


@st.composite
def tables(draw):
    """Random per-layer tables in the shape the scan hands to locate_me_layer."""
    n = draw(st.integers(2, 8))
    keys = [(p, d) for p in range(3) for d in range(4)]
    massive = []
    for _ in range(n):
        entries = draw(st.lists(st.sampled_from(keys), max_size=3, unique=True))
        massive.append([(draw(st.sampled_from([-1.0, 1.0])) * draw(st.floats(150, 1e5)), p, d) for p, d in entries])
    medians = [draw(st.floats(0.01, 50)) for _ in range(n)]
    seen: set[tuple[int, int]] = set()
    watched = []
    for layer in range(n):
        watched.append({k: draw(st.sampled_from([0.0, 5.0, 3e3, -3e4])) for k in sorted(seen)})
        seen |= {(p, d) for _, p, d in massive[layer]}
    return massive, watched, medians


def _holds(massive, watched, medians, crit, layer, key):
    later = [crit.persists(watched[j].get(key, 0.0), medians[j]) for j in range(layer + 1, len(massive))]
    return bool(later) and later[0] and sum(later) >= crit.persist_frac * len(later)


@given(t=tables(), frac=st.sampled_from([0.5, 0.75, 1.0]))
def test_me_layer_is_the_first_layer_whose_massive_entry_persists(t, frac):
    massive, watched, medians = t
    crit = Criterion(persist_frac=frac)
    me, persistent = locate_me_layer(massive, watched, medians, crit)
    first_seen = {}
    for layer, entries in enumerate(massive):
        for _, p, d in entries:
            first_seen.setdefault((p, d), layer)
    holds = {k: _holds(massive, watched, medians, crit, layer, k) for k, layer in first_seen.items()}
    assert persistent == {k for k, ok in holds.items() if ok}
    assert me == min((first_seen[k] for k in persistent), default=None)


@given(t=tables(), scale=st.floats(0.1, 10))
def test_me_layer_depends_on_ratios_only_when_abs_min_is_zero(t, scale):
    massive, watched, medians = t
    crit = Criterion(abs_min=0.0)
    scaled = ([[(v * scale, p, d) for v, p, d in m] for m in massive],
              [{k: v * scale for k, v in w.items()} for w in watched], [m * scale for m in medians])
    flipped = ([[(-v, p, d) for v, p, d in m] for m in massive], [{k: -v for k, v in w.items()} for w in watched],
               medians)
    assert locate_me_layer(*scaled, crit) == locate_me_layer(massive, watched, medians, crit)
    assert locate_me_layer(*flipped, crit) == locate_me_layer(massive, watched, medians, crit)


# ------------------------------------------------------------------------------------------------ answers


def _written(n: int, style: int) -> str:
    body = f"{abs(n):,}" if style in (1, 3) else str(abs(n))
    body = "$" + body if style in (2, 3) else body
    body = body + ".00" if style == 4 else body
    return ("-" if n < 0 else "") + body


@given(n=st.integers(-10**12, 10**12), style=st.integers(0, 4))
def test_numbers_normalise_to_their_integer(n, style):
    written = _written(n, style)
    assert A.normalize_number(written) == str(n)
    assert A.gsm8k_score(f"Some steps. #### {written}", str(n))["exact_match_strict"] == 1.0
    assert A.gsm8k_score(f"So the answer is {written}", str(n + 1))["exact_match_flexible"] == 0.0


@given(nums=st.lists(st.integers(0, 10**6), min_size=1, max_size=6), words=st.sampled_from(["apples", "so", "and"]))
def test_flexible_takes_the_last_number_and_strict_the_first_marker(nums, words):
    text = f" {words} ".join(str(n) for n in nums)
    assert A.gsm8k_flexible(text) == str(nums[-1])
    assert A.gsm8k_strict(text) is None
    marked = " ".join(f"#### {n}" for n in nums)
    assert A.gsm8k_strict(marked) == str(nums[0])


# ------------------------------------------------------------------------------------------------ statistics


binary = st.lists(st.integers(0, 1), min_size=2, max_size=40)


@settings(max_examples=25)
@given(a=binary, data=st.data())
def test_mcnemar_counts_and_symmetry(a, data):
    b = data.draw(st.lists(st.integers(0, 1), min_size=len(a), max_size=len(a)))
    r, s = stats.mcnemar(a, b), stats.mcnemar(b, a)
    assert r["gained"] == sum(1 for x, y in zip(a, b) if x == 0 and y == 1)
    assert r["lost"] == sum(1 for x, y in zip(a, b) if x == 1 and y == 0)
    assert (s["gained"], s["lost"]) == (r["lost"], r["gained"]) and s["p"] == pytest.approx(r["p"])
    assert 0 < r["p"] <= 1
    if r["gained"] == r["lost"]:  # no evidence either way (including no discordant pair)
        assert r["p"] == 1.0


@given(a=st.lists(st.floats(-100, 100), min_size=2, max_size=30), shift=st.floats(-5, 5))
def test_paired_bootstrap_of_a_constant_shift_is_exact(a, shift):
    """new = base + c on every sample: every resample's difference is c, so diff = c and the CI is [c, c]."""
    base = np.array(a)
    r = stats.paired_bootstrap("mean", base, base + shift, n_boot=50)
    assert r["diff"] == pytest.approx(shift, abs=1e-9)
    assert r["ci95"] == pytest.approx([shift, shift], abs=1e-9)


@given(a=st.lists(st.floats(-100, 100), min_size=2, max_size=30))
def test_bootstrap_interval_lies_within_the_sample_range(a):
    lo, hi = stats.bootstrap_ci("mean", a, n_boot=50)
    assert min(a) - 1e-9 <= lo <= hi <= max(a) + 1e-9
    assert min(a) - 1e-9 <= stats.aggregate("mean", a) <= max(a) + 1e-9


@given(pairs=st.lists(st.tuples(st.floats(0, 50), st.integers(1, 200)), min_size=1, max_size=20))
def test_ratio_kinds_pool_numerators_and_denominators(pairs):
    num = sum(p for p, _ in pairs)
    den = sum(q for _, q in pairs)
    assert stats.aggregate("ratio", pairs) == pytest.approx(num / den)
    assert stats.aggregate("exp_ratio", pairs) == pytest.approx(np.exp(num / den))


# ------------------------------------------------------------------------------------------------ layer lists


@given(layers=st.sets(st.integers(0, 39), min_size=1, max_size=40))
def test_layer_lists_round_trip(layers):
    text = format_layers(sorted(layers))
    assert parse_layers(text, 40) == sorted(layers)
    assert parse_layers(text.replace(",", ";"), 40) == sorted(layers)  # lm-eval's model_args separator


@given(layers=st.lists(st.integers(0, 17), min_size=1, max_size=10))
def test_layer_list_order_and_repeats_do_not_matter(layers):
    assert parse_layers(layers, 18) == sorted(set(layers))
    assert parse_layers(" ".join(map(str, layers)), 18) == sorted(set(layers))
