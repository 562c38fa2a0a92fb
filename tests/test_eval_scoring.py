"""Answer extraction, scoring rules, paired statistics and the vendored data (no model needed)."""

from __future__ import annotations

import numpy as np
import pytest

from melayer.eval import answers as A
from melayer.eval import data, stats
from melayer.eval.tasks import TASKS, get_task
from melayer.util.errors import MelayerError

# ------------------------------------------------------------------------------------------------- GSM8K


def test_gsm8k_strict_takes_the_number_after_hashes_or_the_answer_is():
    assert A.gsm8k_strict("16 - 3 - 4 = 9 eggs, 9 * 2 = 18.\n#### 18") == "18"
    assert A.gsm8k_strict("So the total is 5.\nThe answer is $1,234.00.") == "1234"
    assert A.gsm8k_strict("The final answer is: -7") == "-7"
    assert A.gsm8k_strict("She has 18 dollars.") is None  # no marker -> no strict answer
    # '####' wins over 'The answer is', and the first '####' is used
    assert A.gsm8k_strict("The answer is 3. #### 4 #### 5") == "4"


def test_gsm8k_flexible_takes_the_last_number():
    assert A.gsm8k_flexible("She pays 5 dollars, gets 3 back: 8 in total") == "8"
    assert A.gsm8k_flexible("cost: $1,000.50 then 2,000") == "2000"
    assert A.gsm8k_flexible("no digits here") is None


def test_gsm8k_strict_and_flexible_differ_and_never_match_substrings():
    out = "Step 1: 3 * 4 = 12 apples.\n#### 12\nQuestion: how many are left? 7"
    s = A.gsm8k_score(out, "12")
    assert (s["strict"], s["flexible"]) == ("12", "7")
    assert (s["exact_match_strict"], s["exact_match_flexible"]) == (1.0, 0.0)
    # substring of the gold ("2" in "12") or gold inside the prediction ("12" in "112") is wrong
    assert A.gsm8k_score("#### 2", "12")["exact_match_strict"] == 0.0
    assert A.gsm8k_score("#### 112", "12")["exact_match_strict"] == 0.0
    assert A.gsm8k_score("so 112", "12")["exact_match_flexible"] == 0.0


def test_gsm8k_numeric_normalisation():
    assert A.normalize_number("18.0") == "18"
    assert A.normalize_number("1,000.00") == "1000"
    assert A.normalize_number("$ 5") == "5"
    assert A.normalize_number("0.50") == "0.5"
    assert A.normalize_number("-0") == "0"
    assert A.normalize_number("abc") is None
    big = "1" + "0" * 40  # longer than decimal's default 28-digit precision
    assert A.normalize_number(big + ".00") == big
    assert A.gsm8k_flexible(f"so {big[:-1]},0") == big
    assert A.gsm8k_score("#### 18.00", "18")["exact_match_strict"] == 1.0


def test_gsm8k_gold_of_the_real_data():
    first = data.gsm8k_test()[0]
    assert "Janet" in first["question"]
    assert A.gsm8k_gold(first["answer"]) == "18"
    rows = data.gsm8k_test()
    golds = [A.gsm8k_gold(d["answer"]) for d in rows]
    assert len(golds) == 1319
    # every gold is the integer after the reference's '####', read independently (GSM8K answers are integers)
    raw = [d["answer"].rsplit("####", 1)[1].strip().replace(",", "") for d in rows]
    assert [int(g) for g in golds] == [int(r) for r in raw]
    with pytest.raises(ValueError, match="no numeric answer"):
        A.gsm8k_gold("a reference without a final number")


# ------------------------------------------------------------------------------------------------- MATH


def test_last_boxed_handles_nesting_and_takes_the_last():
    assert A.last_boxed("first \\boxed{1} then \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert A.last_boxed("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}") == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert A.last_boxed("\\fbox{7}") == "7"
    assert A.last_boxed("no box") is None
    assert A.last_boxed("\\boxed{unbalanced") is None


def test_math_verify_equivalence():
    assert A.math_equivalent("\\frac{1}{2}", "0.5")
    assert A.math_equivalent("\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\pi/2)")
    assert A.math_equivalent("10", "10")
    assert not A.math_equivalent("12", "2")  # the reference code's substring rule would accept this
    assert not A.math_equivalent("12", "")  # ... and an empty box
    assert not A.math_equivalent("12", None)
    s = A.math_score("so the answer is \\boxed{\\dfrac{1}{2}}.", "\\frac{1}{2}")
    assert s == {"boxed": "\\dfrac{1}{2}", "exact_match": 1.0}


# ------------------------------------------------------------------------------------------------- IFEval


def _ifeval_doc(key: int) -> dict:
    return next(d for d in data.ifeval() if d["key"] == key)


def test_ifeval_official_checker_on_known_responses():
    bullets = _ifeval_doc(102)  # detectable_format:number_bullet_lists, num_bullets=3
    assert bullets["instruction_id_list"] == ["detectable_format:number_bullet_lists"]
    ok = A.ifeval_score(bullets, "* ball gown talk\n* jeans talk\n* both laugh")
    bad = A.ifeval_score(bullets, "* ball gown talk\n* jeans talk")
    assert ok["prompt_level_strict_acc"] == 1.0 and ok["inst_level_strict_acc"] == [1.0, 1.0]
    assert bad["prompt_level_strict_acc"] == 0.0 and bad["prompt_level_loose_acc"] == 0.0

    lower = _ifeval_doc(1051)  # change_case:english_lowercase
    # strict fails on the capitalised first line; loose drops the first line and passes
    s = A.ifeval_score(lower, "Sure! Here Is The Letter:\ndear friend, please go and vote in the election next week.")
    assert s["prompt_level_strict_acc"] == 0.0 and s["prompt_level_loose_acc"] == 1.0
    assert s["follow_strict"] == [False] and s["follow_loose"] == [True]


def test_ifeval_nltk_data_is_vendored_and_used():
    import os

    path = data.ensure_nltk_data()
    assert path in os.environ["NLTK_DATA"].split(os.pathsep)
    from lm_eval.tasks.ifeval import instructions_util

    assert instructions_util.count_sentences("Dr. Smith went home. He was tired. Really?") == 3


# ------------------------------------------------------------------------------------------------- stats


def test_mcnemar_matches_a_hand_computed_exact_p():
    # 1 sample gained, 6 lost, 13 unchanged: p = 2 * P(X <= 1 | n=7, 1/2) = 2 * (1 + 7) / 128 = 0.125
    base = [0] * 1 + [1] * 6 + [1] * 8 + [0] * 5
    new = [1] * 1 + [0] * 6 + [1] * 8 + [0] * 5
    r = stats.mcnemar(base, new)
    assert (r["gained"], r["lost"], r["discordant"]) == (1, 6, 7)
    assert r["p"] == pytest.approx(0.125)
    assert stats.mcnemar([1, 0, 1], [1, 0, 1])["p"] == 1.0


def test_paired_bootstrap_ci_contains_the_true_difference():
    rng = np.random.default_rng(123)
    n = 3000
    base = (rng.random(n) < 0.5).astype(float)
    flip = rng.random(n) < 0.2  # 20 % of wrong answers become right -> true difference +0.1
    new = np.where((base == 0) & flip, 1.0, base)
    r = stats.paired_bootstrap("mean", base, new, n_boot=2000, seed=0)
    assert r["diff"] == pytest.approx(new.mean() - base.mean())
    assert r["ci95"][0] <= 0.1 <= r["ci95"][1]
    assert r["ci95"][0] > 0  # a real effect is detected
    # deterministic with a fixed seed
    assert stats.paired_bootstrap("mean", base, new, n_boot=2000, seed=0) == r
    # the paired CI is much narrower than the unpaired CI of either run
    lo, hi = stats.bootstrap_ci("mean", new)
    assert r["ci95"][1] - r["ci95"][0] < (hi - lo)


def test_aggregate_kinds():
    assert stats.aggregate("mean", [1, 0, 1, 1]) == 0.75
    assert stats.aggregate("ratio", [[1, 2], [3, 4]]) == pytest.approx(4 / 6)
    assert stats.aggregate("exp_ratio", [[2.0, 1.0], [4.0, 2.0]]) == pytest.approx(np.exp(2.0))
    assert stats.aggregate("exp_neg_mean", [-1.0, -3.0]) == pytest.approx(np.exp(2.0))
    with pytest.raises(ValueError):
        stats.aggregate("ratio", [1, 2])


def test_bootstrap_interval_has_the_stated_95_percent_level():
    """The percentile interval of a mean of n normal draws is ~ mean +- 1.96 s / sqrt(n) (a 90 % interval would
    be 16 % narrower), and agrees with scipy's percentile bootstrap at the same level."""
    from scipy.stats import bootstrap, norm

    rng = np.random.default_rng(7)
    x = rng.normal(3.0, 2.0, size=400)
    se = x.std() / np.sqrt(len(x))  # the bootstrap's standard error uses the plug-in (population) sd
    lo, hi = stats.bootstrap_ci("mean", x, n_boot=4000, seed=1)
    z = norm.ppf(0.975)
    assert (hi - lo) / (2 * z * se) == pytest.approx(1.0, abs=0.05)
    assert (lo + hi) / 2 == pytest.approx(x.mean(), abs=0.1 * se)
    ref = bootstrap((x,), np.mean, confidence_level=0.95, method="percentile", n_resamples=4000,
                    random_state=np.random.default_rng(2)).confidence_interval
    assert lo == pytest.approx(ref.low, abs=0.1 * se) and hi == pytest.approx(ref.high, abs=0.1 * se)
    # the level argument is honoured
    lo90, hi90 = stats.bootstrap_ci("mean", x, n_boot=4000, seed=1, level=0.90)
    assert (hi90 - lo90) / (2 * norm.ppf(0.95) * se) == pytest.approx(1.0, abs=0.05)


def test_paired_bootstrap_interval_has_the_stated_95_percent_level():
    """Paired: the interval of mean(new) - mean(base) is ~ diff +- 1.96 sd(new - base) / sqrt(n), far narrower
    than the unpaired one because base and new are strongly correlated."""
    from scipy.stats import norm

    rng = np.random.default_rng(11)
    base = rng.normal(0.0, 5.0, size=500)
    new = base + rng.normal(0.3, 0.5, size=500)
    d = new - base
    se = d.std() / np.sqrt(len(d))
    r = stats.paired_bootstrap("mean", base, new, n_boot=4000, seed=3)
    assert r["diff"] == pytest.approx(d.mean())
    lo, hi = r["ci95"]
    assert (hi - lo) / (2 * norm.ppf(0.975) * se) == pytest.approx(1.0, abs=0.05)
    assert (lo + hi) / 2 == pytest.approx(d.mean(), abs=0.1 * se)


def test_mcnemar_is_two_sided_and_names_the_direction():
    """gained = wrong at baseline, right after; lost = the reverse. The exact p is symmetric in the two."""
    from scipy.stats import binomtest

    base = [1] * 9 + [0] * 2 + [1] * 5 + [0] * 4
    new = [0] * 9 + [1] * 2 + [1] * 5 + [0] * 4
    r = stats.mcnemar(base, new)
    assert (r["gained"], r["lost"], r["discordant"]) == (2, 9, 11)
    # two-sided: 2 * P(X <= 2 | n=11, 1/2) = 2 * (1 + 11 + 55) / 2048
    assert r["p"] == pytest.approx(2 * 67 / 2048)
    assert r["p"] == pytest.approx(binomtest(2, 11).pvalue)
    swapped = stats.mcnemar(new, base)
    assert (swapped["gained"], swapped["lost"], swapped["p"]) == (9, 2, r["p"])


# ------------------------------------------------------------------------------------------------- data


@pytest.mark.parametrize("name,count", [
    ("gsm8k", 1319), ("math500", 500), ("ifeval", 541), ("arc_easy", 2376), ("arc_challenge", 1172),
    ("hellaswag", 10042), ("lambada", 5153), ("winogrande", 1267),
])
def test_vendored_data_counts_and_stable_ids(name, count):
    task = get_task(name)
    samples = task.load()
    assert len(samples) == count
    ids = [s.id for s in samples]
    assert len(set(ids)) == count
    assert [s.id for s in task.load(5)] == ids[:5]


def test_data_is_found_through_importlib_resources():
    from importlib import resources

    root = resources.files("melayer.data") / "eval"
    for sub in ("gsm8k/test.jsonl", "gsm8k/LICENSE", "ifeval/LICENSE", "math500/test.jsonl", "wikitext2/wiki.test.raw",
                "arc/ARC-Easy-Test.jsonl", "hellaswag/hellaswag_val_full.txt.bz2", "lambada/NOTICE.md",
                "winogrande/dev.jsonl", "nltk_data/tokenizers/punkt_tab/english/ortho_context.tab"):
        assert (root / sub).is_file(), sub
    for task_dir in ("gsm8k", "math500", "ifeval", "wikitext2", "arc", "hellaswag", "lambada", "winogrande", "nltk_data"):
        assert (root / task_dir / "NOTICE.md").is_file()


def test_prompt_formats_follow_lm_eval():
    arc = get_task("arc_easy")
    req = arc.request(arc.load(1)[0])
    assert req.contexts[0].startswith("Question: ") and req.contexts[0].endswith("\nAnswer:")
    assert all(c.startswith(" ") for c in req.continuations) and req.gold == 0
    wino = get_task("winogrande")
    w = wino.request(wino.load(1)[0])
    assert w.contexts == ["Sarah was a much better surgeon than Maria so Sarah",
                          "Sarah was a much better surgeon than Maria so Maria"]
    assert w.continuations == [" always got the easier cases."] and w.gold == 1
    lam = get_task("lambada")
    r = lam.request(lam.load(1)[0])
    assert " " + lam.load(1)[0].doc["text"].split(" ")[-1] == r.continuations[0]
    g = get_task("gsm8k", num_fewshot=2)
    prompt = g.plain(g.load(1)[0])
    assert prompt.count("Question: ") == 3 and prompt.endswith("\nAnswer:")
    assert data.gsm8k_fewshot()[0]["question"] in prompt  # exemplars come from train, not test
    assert g.load(1)[0].doc["question"] not in prompt[: prompt.rindex("Question: ")]


def test_task_registry_rejects_bad_names_and_options():
    assert set(TASKS) == {"ppl", "gsm8k", "math500", "ifeval", "arc_easy", "arc_challenge", "hellaswag", "lambada",
                          "winogrande", "mmlu", "mmlu_continuation", "aime24", "xstest"}
    with pytest.raises(MelayerError, match="unknown task"):
        get_task("mmlu_pro")
    with pytest.raises(MelayerError, match="num-fewshot"):
        get_task("gsm8k", num_fewshot=9)
    with pytest.raises(MelayerError, match="takes no option"):
        get_task("arc_easy", num_fewshot=1)
    with pytest.raises(MelayerError, match="stride"):
        get_task("ppl", window=64, stride=64)
