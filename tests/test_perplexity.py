"""The one perplexity implementation (melayer.analysis.perplexity): its windows, its agreement with lm-eval's
rolling log-likelihood, and explain and eval's ``ppl`` task scoring the same windows identically."""

from __future__ import annotations

import math

import pytest

from melayer.analysis.perplexity import (
    Window,
    perplexity,
    ppl_text,
    rolling_windows,
    tail_logliks,
    window_rows,
)
from melayer.eval.tasks import RunContext, get_task
from melayer.testing import tiny_lm
from melayer.util.errors import MelayerError


@pytest.fixture(scope="module")
def lm():
    return tiny_lm("llama", plant=False)  # its tokenizer prepends <bos> (id 0)


def scored_positions(n: int, windows: list[Window], prefix_len: int) -> list[int]:
    return [i for w in windows for i in range(w.end - w.scored, w.end)]


@pytest.mark.parametrize(("n", "window", "stride", "prefix_len"),
                         [(100, 17, 16, 1), (100, 16, 15, 0), (101, 33, 8, 1), (5, 64, 48, 0), (64, 17, 16, 1)])
def test_every_token_scored_once_with_bounded_context(n, window, stride, prefix_len):
    windows = rolling_windows(n, window=window, stride=stride, prefix_len=prefix_len)
    # a prefix lets the first token be scored; without one it has no context and is left out
    assert scored_positions(n, windows, prefix_len) == list(range(0 if prefix_len else 1, n))
    for k, w in enumerate(windows):
        assert w.begin == k * stride and prefix_len + (w.end - w.begin) <= window and 1 <= w.scored <= w.end - w.begin


def test_bad_window_and_stride():
    with pytest.raises(MelayerError, match="stride"):
        rolling_windows(10, window=17, stride=17, prefix_len=1)  # would skip a token per window
    with pytest.raises(MelayerError, match="stride"):
        rolling_windows(10, window=16, stride=16, prefix_len=0)  # each window's first token would go unscored


def test_rolling_loglik_matches_lm_eval(lm):
    """lm-eval's HFLM.loglikelihood_rolling (max_length L) = our windows of L+1 tokens advancing by L over lm-eval's
    prefix token + the text (one token of carried context, no per-window prefix), when the last window is full;
    and, on a text that fits one window, = our default per-window-<bos> perplexity."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    L = 16
    text = "".join(c for c in ppl_text() if c.isascii() and c != "\n")[:3 * L]
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 3 * L  # one token per byte: three full lm-eval windows
    # add_bos_token=False: lm-eval 0.4 otherwise tokenises the text with its <bos> and also scores that <bos>
    # (after its own prefix <bos>); here the text is the text and the prefix token conditions its first token
    ref = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=2, max_length=L, add_bos_token=False)
    assert ref.prefix_token_id == lm.tokenizer.bos_token_id and ref.tok_encode(text) == ids

    def theirs(t: str) -> float:
        return ref.loglikelihood_rolling([Instance(request_type="loglikelihood_rolling", doc={}, arguments=(t,), idx=0)],
                                         disable_tqdm=True)[0]

    seq = [ref.prefix_token_id, *ids]
    windows = rolling_windows(len(seq), window=L + 1, stride=L, prefix_len=0)
    ours = sum(ll for ll, _ in tail_logliks(lm, window_rows(seq, windows, [])))
    assert sum(w.scored for w in windows) == len(ids)
    assert ours == pytest.approx(theirs(text), rel=1e-5)

    short = text[:L]
    r = perplexity(lm, short, stride=L)
    assert r["tokens"] == L and r["prefix"] == [lm.tokenizer.bos_token_id]
    assert r["ppl"] == pytest.approx(math.exp(-theirs(short) / L), rel=1e-5)


def test_explain_and_eval_ppl_score_the_same_windows_alike(lm):
    """explain's perplexity (prefix + 16 fresh tokens per window) = eval's ppl task at window 17, stride 16 on the
    same tokens: one implementation, two callers."""
    ids = lm.tokenizer(ppl_text(), add_special_tokens=False)["input_ids"][:70]
    r = perplexity(lm, max_tokens=70, stride=16)
    task = get_task("ppl", window=r["window"], stride=r["stride"])
    task._cache[id(lm.tokenizer)] = (ids, r["prefix"])  # the task's text, swapped for the same 70 tokens
    samples = task.load(None, lm=lm)
    recs = task.run_batch(lm, samples, RunContext(chat=False, max_new_tokens=None))
    nll, n = (sum(x["metrics"]["ppl"][i] for x in recs) for i in (0, 1))
    assert n == r["tokens"] == 70 and math.exp(nll / n) == pytest.approx(r["ppl"], rel=1e-6)
