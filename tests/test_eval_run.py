"""The runner, engine, resume, reproducibility and compare, on tiny real checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import argmax_decode

from melayer.eval import engine as E
from melayer.eval import run
from melayer.eval.compare import compare, parse_rates, sinks_available
from melayer.eval.tasks import get_task
from melayer.testing import tiny_lm
from melayer.util.errors import MelayerError
from melayer.util.io import read_jsonl


@pytest.fixture(scope="module")
def lm():
    return tiny_lm("llama")


def _reference_loglik(lm, ctx, cont, intervention=None):
    """Unbatched, unpadded: one forward over context + continuation, read the continuation's log-probs."""
    row = torch.tensor([ctx + cont])
    with torch.no_grad(), (intervention() if intervention else torch.no_grad()):
        logp = lm.model(row).logits[0].float().log_softmax(-1)
    k = len(cont)
    return float(logp[-k - 1:-1].gather(-1, row[0, -k:, None]).sum())


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "gpt2"])
def test_context_reuse_equals_full_forward(model_type):
    from melayer.interventions.wemask import wemask

    lm = tiny_lm(model_type)
    task = get_task("arc_easy")
    pairs = [p for s in task.load(3) for p in task._pairs(task.request(s))]
    contexts, toks = task._tokenize(lm, pairs, chat=False)
    assert len(contexts) == 3 and len(toks) == len(pairs)  # each context tokenised once
    for iv in (None, lambda: wemask(lm, 0.25, me_layer=1)):
        shared = E.score_continuations(lm, contexts, toks, intervention=iv)
        full = E.score_tails(lm, [(contexts[ci] + t, len(t)) for ci, t in toks], intervention=iv)
        for (a, _), (b, _), (ci, t) in zip(shared, full, toks):
            ref = _reference_loglik(lm, contexts[ci], t, iv)
            assert a == pytest.approx(ref, abs=1e-3, rel=1e-5)
            assert b == pytest.approx(ref, abs=1e-3, rel=1e-5)


def test_greedy_flag_matches_argmax(lm):
    ctx = lm.tokenizer("hello world")["input_ids"]
    with torch.no_grad():
        logits = lm.model(torch.tensor([ctx])).logits[0]
    best = int(logits[-1].argmax())
    other = (best + 1) % logits.shape[-1]
    (_, g1), (_, g2) = E.score_continuations(lm, [ctx], [(0, [best]), (0, [other])])
    assert g1 is True and g2 is False


def test_batched_generation_equals_one_by_one(lm):
    rows = [lm.tokenizer(t)["input_ids"] for t in ("Question: 2+2?\nAnswer:", "hi", "a longer prompt here")]
    together = E.generate(lm, rows, max_new_tokens=6)
    alone = [E.generate(lm, [r], max_new_tokens=6)[0] for r in rows]
    assert [o["text"] for o in together] == [o["text"] for o in alone]


def test_generation_equals_an_independent_greedy_decode_and_stops_at_eos():
    lm = tiny_lm("llama")
    rows = [lm.tokenizer(t)["input_ids"] for t in ("Question: 2+2?\nAnswer:", "hi", "a longer prompt here")]
    n = 8
    free = [argmax_decode(lm, r, n)[0] for r in rows]
    out = E.generate(lm, rows, max_new_tokens=n)
    for o, ref in zip(out, free):
        assert (o["text"], o["new_tokens"], o["finish"]) == (lm.tokenizer.decode(ref), n, "length")
    # make the token that row 0 first produces at step >= 2 an end-of-sequence token: row 0 must stop there,
    # the others wherever they meet it (or run to the length limit)
    step = next(j for j in range(2, n) if free[0][j] not in free[0][:j] and free[0][j] > 2)
    stop_token = free[0][step]
    lm.model.generation_config.eos_token_id = [lm.tokenizer.eos_token_id, stop_token]
    out = E.generate(lm, rows, max_new_tokens=n)
    for o, r in zip(out, rows, strict=True):
        ref, hit = argmax_decode(lm, r, n, eos=(lm.tokenizer.eos_token_id, stop_token))
        assert (o["text"], o["new_tokens"], o["finish"]) == (lm.tokenizer.decode(ref), len(ref),
                                                              "eos" if hit else "length")
    assert (out[0]["new_tokens"], out[0]["finish"]) == (step, "eos")


def test_stop_strings_cut_the_output():
    assert E.cut_at_stop("42\nQuestion: next", ["Question:"]) == "42\n"
    assert E.cut_at_stop("no stop", ["Question:"]) == "no stop"


def test_eval_json_schema_and_settings(lm, tmp_path):
    r = run(lm, "arc_easy", limit=5, batch_size=2, output=tmp_path, progress=False)
    d = json.loads((tmp_path / "eval.json").read_text())
    assert d["schema"] == "melayer.eval/1" and d["task"] == "arc_easy" and d["model"] == lm.name
    s = d["settings"]
    assert s["batch_size"] == 2 and s["limit"] == 5 and s["chat"] is False and s["max_new_tokens"] is None
    assert "Question: {question}" in s["prompt_format"] and s["intervention"] is None
    for name in ("acc", "acc_norm"):
        m = d["metrics"][name]
        assert 0 <= m["value"] <= 1 and m["n"] == 5 and m["ci95"][0] <= m["value"] <= m["ci95"][1]
    assert d["n_samples"] == 5 == len(read_jsonl(tmp_path / "samples.jsonl"))
    assert r.metrics["acc"]["value"] == pytest.approx(sum(rec["pred"] == rec["gold"] for rec in r.records) / 5)


@pytest.mark.parametrize("task, opts", [("hellaswag", {}), ("gsm8k", {"max_new_tokens": 6})])
def test_a_resumed_run_equals_an_uninterrupted_one_exactly(lm, tmp_path, task, opts):
    """Killed after two batches, the second only half saved (a kill between two appends, then a torn line): the
    resumed run reruns the half-saved batch whole (the plan covers every sample, done or not), writes only the
    missing samples, and ends bit-identical to an uninterrupted run: records, samples.jsonl, eval.json metrics."""

    class Killed(Exception):
        pass

    seen = []

    def kill_after_two_batches(records):
        seen.append(len(records))
        if len(seen) == 2:
            raise Killed

    args = dict(limit=10, batch_size=3, progress=False, **opts)
    with pytest.raises(Killed):
        run(lm, task, output=tmp_path, on_batch=kill_after_two_batches, **args)
    assert seen == [3, 3] and not (tmp_path / "eval.json").exists()
    log = tmp_path / "samples.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    assert len(lines) == 6
    log.write_text("".join(lines[:4]) + lines[4][: len(lines[4]) // 2])  # 4 whole records, then a torn one
    calls = []
    r = run(lm, task, output=tmp_path, on_batch=calls.append, **args)
    assert [len(c) for c in calls] == [2, 3, 1]  # batch 2 rerun whole, only its 2 missing samples written
    ids = [rec["id"] for rec in read_jsonl(log)]
    assert sorted(ids) == sorted(f"{task}-{i}" for i in range(10)) and len(ids) == 10
    fresh = run(lm, task, output=tmp_path / "fresh", **args)
    assert r.records == fresh.records  # exact, every float
    assert log.read_text() == (tmp_path / "fresh" / "samples.jsonl").read_text()  # same records, same order
    got, want = (json.loads((d / "eval.json").read_text()) for d in (tmp_path, tmp_path / "fresh"))
    assert got["metrics"] == want["metrics"] and got["n_samples"] == want["n_samples"] == 10
    assert got["truncated"] == want["truncated"] and got["settings"]["settings_key"] == want["settings"]["settings_key"]


def test_resume_with_a_smaller_limit_and_duplicate_lines(lm, tmp_path):
    """A folder holding 4 samples, asked for 2: the first 2 are reported (not all 4), nothing runs. A duplicated
    line (two writers, or a copy) does not count twice: the first record of an id is the one used."""
    full = run(lm, "arc_easy", limit=4, batch_size=4, output=tmp_path, progress=False)
    calls = []
    small = run(lm, "arc_easy", limit=2, batch_size=4, output=tmp_path, progress=False, on_batch=calls.append)
    assert calls == []
    assert small.n_samples == 2 and small.ids() == full.ids()[:2] and small.records == full.records[:2]
    acc = [rec["metrics"]["acc"] for rec in full.records[:2]]
    assert small.metrics["acc"]["value"] == sum(acc) / 2 and small.metrics["acc"]["n"] == 2
    assert json.loads((tmp_path / "eval.json").read_text())["n_samples"] == 2
    # duplicate the first line with the opposite outcome; the original (first) line wins
    path = tmp_path / "samples.jsonl"
    first = json.loads(path.read_text().splitlines()[0])
    dup = {**first, "metrics": {**first["metrics"], "acc": 1.0 - first["metrics"]["acc"]}}
    with open(path, "a") as fh:
        fh.write(json.dumps(dup) + "\n")
    again = run(lm, "arc_easy", limit=4, batch_size=4, output=tmp_path, progress=False, on_batch=calls.append)
    assert calls == [] and again.n_samples == 4 and again.ids() == full.ids()
    assert again.records == full.records and again.metrics == full.metrics


def test_resume_refuses_different_settings_and_overwrite_works(lm, tmp_path):
    run(lm, "gsm8k", limit=2, batch_size=2, output=tmp_path, max_new_tokens=4, progress=False)
    with pytest.raises(MelayerError, match="different settings.*--overwrite"):
        run(lm, "gsm8k", limit=2, batch_size=2, output=tmp_path, max_new_tokens=5, progress=False)
    r = run(lm, "gsm8k", limit=2, batch_size=2, output=tmp_path, max_new_tokens=5, progress=False, overwrite=True)
    assert r.settings["max_new_tokens"] == 5 and len(read_jsonl(tmp_path / "samples.jsonl")) == 2
    # extending a finished run to more samples reuses what is there
    calls = []
    run(lm, "gsm8k", limit=3, batch_size=2, output=tmp_path, max_new_tokens=5, progress=False, on_batch=calls.append)
    assert sum(len(c) for c in calls) == 1


def test_greedy_generation_runs_are_reproducible(lm, tmp_path):
    a = run(lm, "gsm8k", limit=3, batch_size=3, output=tmp_path / "a", max_new_tokens=12, progress=False)
    b = run(lm, "gsm8k", limit=3, batch_size=3, output=tmp_path / "b", max_new_tokens=12, progress=False)
    assert [r["output"] for r in a.records] == [r["output"] for r in b.records]
    assert all(r["new_tokens"] <= 12 for r in a.records)
    assert (tmp_path / "a" / "samples.jsonl").read_text() == (tmp_path / "b" / "samples.jsonl").read_text()


def test_generation_tasks_score_every_sample(lm):
    r = run(lm, "ifeval", limit=3, batch_size=3, max_new_tokens=4, progress=False)
    assert set(r.metrics) == {"prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc",
                              "inst_level_loose_acc"}
    assert all(len(rec["follow_strict"]) == rec["metrics"]["inst_level_strict_acc"][1] for rec in r.records)
    m = run(lm, "math500", limit=2, batch_size=2, max_new_tokens=4, progress=False)
    assert m.metrics["exact_match"]["n"] == 2


def test_perplexity_windows_cover_every_token_once(lm):
    task = get_task("ppl", window=64, stride=48)
    windows = task.load(lm=lm)
    ids, prefix = task._tokens(lm)
    assert prefix == [0]  # the tiny tokenizer prepends <bos>
    assert sum(w.doc["scored"] for w in windows) == len(ids)
    assert all(w.doc["end"] - w.doc["begin"] <= 63 for w in windows)
    r = run(lm, task, limit=3, batch_size=3, progress=False)
    recs = r.records
    total = sum(x["metrics"]["ppl"][0] for x in recs) / sum(x["metrics"]["ppl"][1] for x in recs)
    assert r.metrics["ppl"]["value"] == pytest.approx(float(torch.tensor(total).exp()))
    assert "windows of 64 tokens" in r.settings["prompt_format"]


def test_intervention_is_applied_and_recorded(lm, tmp_path):
    from melayer.interventions.wemask import wemask

    base = run(lm, "lambada", limit=4, batch_size=4, progress=False)
    masked = run(lm, "lambada", limit=4, batch_size=4, output=tmp_path, progress=False,
                 intervention=wemask(lm, 0.5, me_layer=1))
    assert [a["loglik"] for a in base.records] != [b["loglik"] for b in masked.records]
    d = json.loads((tmp_path / "eval.json").read_text())
    assert d["settings"]["intervention"]["rate"] == 0.5 and d["settings"]["intervention"]["layers"] == [2, 3]


def test_compare_pairs_rates_against_baseline(lm, tmp_path):
    r = compare(lm, "arc_easy", "0.5,0.05", limit=8, batch_size=4, output=tmp_path, me_layer=1, progress=False,
                n_boot=200)
    d = json.loads((tmp_path / "compare.json").read_text())
    assert d["schema"] == "melayer.compare/1" and d["rates"] == [0.0, 0.05, 0.5]
    assert d["me_layer"] == 1 and d["layers"] == [2, 3] and d["select"] == "activation"
    base, *others = d["per_rate"]
    assert "vs_baseline" not in base["metrics"]["acc"]
    for row in others:
        for name in ("acc", "acc_norm"):
            _check_paired(row["metrics"][name], r.runs[0.0].values(name), r.runs[row["rate"]].values(name))
        assert row["wemask"]["k"] == int(row["rate"] * lm.hidden_size)
    if sinks_available() is None:  # melayer.analysis.sinks present: sink rate with and without the mask
        assert d["sinks"]["note"] is None and d["sinks"]["epsilon"] == 0.3
        assert all(0.0 <= row["sink_rate"] <= 1.0 for row in d["per_rate"])
    else:
        assert all("sink_rate" not in row for row in d["per_rate"]) and d["sinks"]["note"]
    from melayer.reporting.compare import dose_response_plot

    dose_response_plot(d, tmp_path / "dose_response.png")  # rendering lives in report/ (the CLI calls it)
    assert (tmp_path / "dose_response.png").stat().st_size > 1000
    for rate in ("0", "0.05", "0.5"):
        assert len(read_jsonl(tmp_path / f"rate_{rate}" / "samples.jsonl")) == 8
    assert r.runs[0.0].ids() == r.runs[0.5].ids()
    # a second compare resumes: nothing is recomputed
    again = compare(lm, "arc_easy", "0.5,0.05", limit=8, batch_size=4, output=tmp_path, me_layer=1, progress=False,
                    n_boot=200)
    assert again.to_dict()["per_rate"] == r.to_dict()["per_rate"]


def _check_paired(entry, base, new):
    """compare's numbers for one metric against an independent computation from the per-sample outcomes."""
    from scipy.stats import binomtest

    diff = sum(new) / len(new) - sum(base) / len(base)
    gained = sum(1 for a, b in zip(base, new) if a == 0 and b == 1)
    lost = sum(1 for a, b in zip(base, new) if a == 1 and b == 0)
    assert entry["vs_baseline"]["diff"] == pytest.approx(diff, abs=1e-12)
    lo, hi = entry["vs_baseline"]["ci95"]
    assert lo <= diff <= hi
    assert (entry["mcnemar"]["gained"], entry["mcnemar"]["lost"]) == (gained, lost)
    assert entry["mcnemar"]["p"] == pytest.approx(binomtest(gained, gained + lost).pvalue if gained + lost else 1.0)


def test_compare_statistics_on_a_known_paired_effect(lm, tmp_path):
    """compare on stored per-sample outcomes with a known effect (resumed through the normal run path): 1 question
    gained, 6 lost, 13 unchanged -> diff -0.25, McNemar gained 1 / lost 6, p = 2 (1 + 7) / 128 = 0.125, and the
    paired 95 % CI equal (to one sample) to scipy's percentile bootstrap of the per-sample differences."""
    import numpy as np
    from scipy.stats import bootstrap

    from melayer.util.io import write_atomic

    kw = dict(limit=20, batch_size=10, output=tmp_path, me_layer=1, progress=False, n_boot=2000, sinks=False)
    first = compare(lm, "arc_easy", "0.5", **kw)
    ids = first.runs[0.0].ids()
    base = [0] * 1 + [1] * 6 + [1] * 8 + [0] * 5
    new = [1] * 1 + [0] * 6 + [1] * 8 + [0] * 5
    for rate, outcome in (("0", base), ("0.5", new)):
        path = tmp_path / f"rate_{rate}" / "samples.jsonl"
        recs = {rec["id"]: rec for rec in read_jsonl(path)}
        for i, v in zip(ids, outcome):
            recs[i]["metrics"]["acc"] = float(v)
            recs[i]["metrics"]["acc_norm"] = float(base[ids.index(i)])  # acc_norm: no effect at all
        text = "".join(json.dumps(recs[i]) + "\n" for i in ids)
        write_atomic(path, lambda p, text=text: p.write_text(text))
    r = compare(lm, "arc_easy", "0.5", **kw)
    row = r.to_dict()["per_rate"][1]
    acc = row["metrics"]["acc"]
    assert acc["value"] == pytest.approx(9 / 20) and r.to_dict()["per_rate"][0]["metrics"]["acc"]["value"] == 0.7
    assert acc["vs_baseline"]["diff"] == pytest.approx(-0.25)
    tested = {k: v for k, v in acc["mcnemar"].items() if k != "p_bh"}
    assert tested == {"gained": 1, "lost": 6, "discordant": 7, "p": pytest.approx(0.125)}
    assert acc["mcnemar"]["p_bh"] >= acc["mcnemar"]["p"]  # Benjamini-Hochberg over the table's tests
    _check_paired(acc, base, new)
    d = np.array(new, float) - np.array(base, float)
    ref = bootstrap((d,), np.mean, confidence_level=0.95, method="percentile", n_resamples=2000,
                    random_state=np.random.default_rng(0)).confidence_interval
    lo, hi = acc["vs_baseline"]["ci95"]
    assert lo == pytest.approx(ref.low, abs=1 / 20 + 1e-9) and hi == pytest.approx(ref.high, abs=1 / 20 + 1e-9)
    assert hi < 0.1 and lo < -0.4  # a loss of 0.25 with a 95 % interval of about +-0.23
    norm = row["metrics"]["acc_norm"]
    assert norm["vs_baseline"] == {"diff": 0.0, "ci95": [0.0, 0.0]} and norm["mcnemar"]["discordant"] == 0


def test_parse_rates():
    assert parse_rates("0.01, 0.001") == [0.0, 0.001, 0.01]
    with pytest.raises(MelayerError, match="out of range"):
        parse_rates("0,1.5")
    with pytest.raises(MelayerError, match="numbers"):
        parse_rates("0,abc")
    with pytest.raises(MelayerError, match="empty"):
        parse_rates(" , ")


@pytest.mark.parametrize("task_name", ["arc_easy", "winogrande", "lambada"])
def test_loglik_matches_lm_eval_reference_implementation(lm, task_name):
    """Our context-reusing scorer agrees with lm-eval's own HFLM.loglikelihood on the same requests."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    # max_length above the tiny config's 256 positions: lm-eval would otherwise cut long contexts from the left
    ref = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=4, max_length=2048)
    task = get_task(task_name)
    pairs = [p for s in task.load(3) for p in task._pairs(task.request(s))]
    theirs = ref.loglikelihood([Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i)
                                for i, p in enumerate(pairs)], disable_tqdm=True)
    contexts, toks = task._tokenize(lm, pairs, chat=False)
    ours = E.score_continuations(lm, contexts, toks)
    for (a, ga), (b, gb) in zip(ours, theirs):
        assert a == pytest.approx(b, abs=1e-3, rel=1e-5) and ga == gb
