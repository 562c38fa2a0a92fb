"""Answer extraction agrees with lm-eval's own GSM8K filters and minerva-math box extraction (issue 8, item 7).

lm-eval's rules are loaded from the installed lm-eval, never copied: the GSM8K regexes from its task YAML run
through its ``RegexFilter``; minerva-math's ``last_boxed_only_string``/``remove_boxed`` are compiled from its
``utils.py`` source (importing that module asserts antlr4 4.11, which conflicts with math-verify's 4.13).
"""

from __future__ import annotations

import ast
from importlib import resources

import pytest
import yaml

from melayer.eval import answers as A


def _lm_eval_gsm8k_filters() -> dict[str, object]:
    from lm_eval.filters.extraction import RegexFilter

    cfg = yaml.safe_load((resources.files("lm_eval") / "tasks" / "gsm8k" / "gsm8k.yaml").read_text())
    out = {}
    for f in cfg["filter_list"]:
        regex = next(step for step in f["filter"] if step["function"] == "regex")
        out[f["name"]] = RegexFilter(regex_pattern=regex["regex_pattern"], group_select=regex.get("group_select", 0))
    return out


def _lm_eval(filter_, text: str) -> str | None:
    got = filter_.apply([[text]], [{}])[0][0]
    return None if got == filter_.fallback else A.normalize_number(got)


def _minerva() -> dict[str, object]:
    src = (resources.files("lm_eval") / "tasks" / "minerva_math" / "utils.py").read_text()
    tree = ast.parse(src)
    wanted = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in ("last_boxed_only_string",
                                                                                      "remove_boxed")]
    assert len(wanted) == 2, "lm-eval's minerva_math utils changed"
    ns: dict[str, object] = {}
    exec(compile(ast.Module(body=wanted, type_ignores=[]), "lm_eval/tasks/minerva_math/utils.py", "exec"), ns)
    return ns


OUTPUTS = [
    "x = 10 - 2",  # a minus sign separated by a space is subtraction, not a sign
    "She pays 10 - 3 = 7 dollars. #### 7",
    "It costs $.50",  # a leading decimal point belongs to the number
    "#### .5",
    "#### -3",
    "#### 1,234",
    "The temperature drops to -4 degrees",
    "3 + 4 = 7 and 7 * 2 = 14.\n#### 14.",
    "total 1,000.50 plus 2",
    "Half of 8 is 4.5 - 0.5 = 4",
]


@pytest.mark.parametrize("text", OUTPUTS)
def test_gsm8k_extraction_matches_lm_eval_filters(text):
    f = _lm_eval_gsm8k_filters()
    assert A.gsm8k_flexible(text) == _lm_eval(f["flexible-extract"], text)
    theirs = _lm_eval(f["strict-match"], text)
    if "####" in text:
        assert A.gsm8k_strict(text) == theirs


def test_gsm8k_issue_examples():
    assert A.gsm8k_flexible("x = 10 - 2") == "2"
    assert A.gsm8k_flexible("It costs $.50") == "0.5"
    assert A.gsm8k_strict("#### .5") == "0.5"
    assert A.gsm8k_score("#### .5", "0.5")["exact_match_strict"] == 1.0
    # still: '$ 5' (a space after the dollar sign) and a sign right before the number
    assert A.gsm8k_flexible("pays $ 5") == "5" and A.gsm8k_flexible("is -$5") == "-5"


BOXES = [
    "so the answer is \\boxed 5",
    "first \\boxed{1} then \\boxed{\\frac{1}{2}}",
    "$\\boxed 12$ is it",
    "\\boxed{3} and finally \\boxed{\\frac{1}{",  # the last box is truncated: no answer, not the earlier box
    "\\fbox{7}",
    "no box here",
]


@pytest.mark.parametrize("text", BOXES)
def test_boxed_extraction_matches_minerva(text):
    m = _minerva()
    box = m["last_boxed_only_string"](text)
    theirs = m["remove_boxed"](box).strip() if box and box.startswith("\\boxed") else None
    if box and box.startswith("\\fbox"):
        theirs = box[len("\\fbox{"):-1]
    assert A.last_boxed(text) == theirs


def test_truncated_last_box_scores_nothing():
    out = "We get \\boxed{3}. Correcting: the answer is \\boxed{\\frac{1}{"
    assert A.last_boxed(out) is None
    assert A.math_score(out, "3")["exact_match"] == 0.0
    assert A.math_score("hence \\boxed 5", "5")["exact_match"] == 1.0
