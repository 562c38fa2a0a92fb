"""MMLU, AIME 2024 and XSTest: per-sample agreement with lm-eval's HFLM on lm-eval's own MMLU task definitions,
and the XSTest refusal rule against the authors' own string-match labels on their reference completions."""

from __future__ import annotations

import csv
import json
from importlib import resources
from pathlib import Path

import pytest

from melayer.eval import answers as A
from melayer.eval import data as D
from melayer.eval import run
from melayer.eval.tasks import get_task
from melayer.testing import tiny_lm
from melayer.util.errors import MelayerError

REFERENCE = Path(__file__).parent / "data" / "xstest"


@pytest.mark.parametrize("model", ["gpt4", "llama2new", "mistralinstruct"])
def test_xstest_rule_reproduces_the_authors_strmatch_labels(model):
    with (REFERENCE / f"xstest_v2_completions_{model}_streval.csv").open(encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 450
    same = sum(A.xstest_label(r["completion"]) == r["strmatch_label"] for r in rows)
    assert same == len(rows), f"{same} of {len(rows)}"
    # and the rule is not trivial on these files: both labels occur
    assert {r["strmatch_label"] for r in rows} == {"1_full_compliance", "2_full_refusal"}


def test_xstest_refusal_sft_data_never_holds_an_evaluated_prompt():
    """bench/finetune_xstest.py: SFT rows are unsafe prompts with the authors' refusals; the safe prompts (evaluated)
    are never trained on; a completion cut by the token budget is undetermined only while it may still become a
    refusal prefix."""
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("finetune_xstest", Path(__file__).parents[1] / "bench" / "finetune_xstest.py")
    bench = module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows, source = bench.refusal_rows(REFERENCE)
    docs = [s.doc for s in get_task("xstest").load()]
    unsafe = {d["prompt"] for d in docs if d["label"] == "unsafe"}
    safe = {d["prompt"] for d in docs if d["label"] == "safe"}
    assert len(rows) == 199 and source == {"llama2new": 186, "gpt4": 13, "none": 1}
    assert {r["prompt"] for r in rows} <= unsafe and not {r["prompt"] for r in rows} & safe
    assert all(A.xstest_label(r["completion"]) == "2_full_refusal" and "\n" not in r["completion"] for r in rows)
    assert bench.undetermined(" I can", "length") and bench.undetermined("As an", "length")
    assert not bench.undetermined(" I can", "eos") and not bench.undetermined("I cannot", "length")
    assert not bench.undetermined("Sure, here", "length") and not bench.undetermined("", "eos")


def test_xstest_data_and_metrics():
    task = get_task("xstest")
    samples = task.load()
    assert len(samples) == 450 and sum(s.doc["label"] == "safe" for s in samples) == 250
    safe = next(s for s in samples if s.doc["label"] == "safe")
    unsafe = next(s for s in samples if s.doc["label"] == "unsafe")
    assert task.score(safe, "  I'm sorry, but no.")["over_refusal"] == [1.0, 1.0]
    assert task.score(safe, "Sure: kill -9 <pid>")["over_refusal"] == [0.0, 1.0]
    assert task.score(unsafe, "I cannot help")["unsafe_refusal"] == [1.0, 1.0]
    assert task.score(unsafe, "I cannot help")["over_refusal"] == [0.0, 0.0]


def test_aime_integer_answers():
    rows = D.aime24()
    assert len(rows) == 30
    assert A.aime_score("thus \\boxed{25}", "025")["exact_match"] == 1.0
    assert A.aime_score("\\boxed{1,000} then \\boxed{\\text{33}}", "033")["exact_match"] == 1.0
    assert A.aime_score("\\boxed{25.5}", "025")["exact_match"] == 0.0
    assert A.aime_score("25", "025")["exact_match"] == 0.0  # no box, no answer
    assert A.aime_score("\\boxed{24} \\boxed{25", "025")["pred"] is None  # a cut-off last box scores nothing


def test_mmlu_subjects_and_groups():
    groups = D.mmlu_groups()
    assert len(groups) == 57 and set(groups.values()) == {"stem", "humanities", "social_sciences", "other"}
    task = get_task("mmlu", subjects="anatomy,high_school_biology")
    assert task.subjects() == ["anatomy", "high_school_biology"]
    assert len(get_task("mmlu").load()) == 14042
    with pytest.raises(MelayerError, match="unknown MMLU subject"):
        get_task("mmlu", subjects="astrology")
    with pytest.raises(MelayerError, match="between 0 and 5"):
        get_task("mmlu", num_fewshot=6)


def _mmlu_docs(subject: str, split: str, n: int | None = None) -> list[dict]:
    return [{"question": d["question"], "subject": subject, "choices": d["choices"], "answer": d["answer"]}
            for d in D.mmlu(subject, split)[:n]]


def _lm_eval_mmlu(variant: str, subject: str, n: int, tmp_path):
    """lm-eval's own mmlu_<subject> task config (default or continuation), its data pointed at the vendored CSVs."""
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    suffix = "" if variant == "default" else "_continuation"
    cfg = load_yaml(str(resources.files("lm_eval") / "tasks" / "mmlu" / variant / f"mmlu_{subject}.yaml"))
    files = {}
    for split, docs in (("test", _mmlu_docs(subject, "test", n)), ("dev", _mmlu_docs(subject, "dev"))):
        path = tmp_path / f"{variant}_{subject}_{split}.jsonl"
        path.write_text("".join(json.dumps(d) + "\n" for d in docs))
        files[split] = str(path)
    cfg.update(task=f"melayer_check_mmlu{suffix}_{subject}", dataset_path="json", dataset_name=None,
               dataset_kwargs={"data_files": files}, test_split="test", fewshot_split="dev")
    cfg.pop("tag", None)
    cfg.pop("include", None)
    return ConfigurableTask(config=cfg)


@pytest.mark.parametrize("variant,task_name,shots", [("default", "mmlu", 0), ("default", "mmlu", 3),
                                                     ("continuation", "mmlu_continuation", 2)])
def test_mmlu_agrees_with_lm_eval_hflm_per_sample(variant, task_name, shots, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    n, subject = 16, "anatomy"
    lm = tiny_lm("llama")
    task = _lm_eval_mmlu(variant, subject, n, tmp_path)
    ref = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=8)
    res = lm_eval.simple_evaluate(model=ref, tasks=[task], num_fewshot=shots, log_samples=True, bootstrap_iters=0)
    theirs = sorted(res["samples"][task.config.task], key=lambda s: s["doc_id"])
    ours = run(lm, task_name, limit=n, batch_size=8, progress=False, subjects=subject, num_fewshot=shots)
    assert len(theirs) == len(ours.records) == n
    for t, o in zip(theirs, ours.records):
        assert t["arguments"][0][0] == get_task(task_name, subjects=subject, num_fewshot=shots).request(
            next(s for s in get_task(task_name, subjects=subject).load() if s.id == o["id"])).contexts[0]
        ll = [float(r[0]) for r in t["filtered_resps"]]
        assert o["logliks"] == pytest.approx(ll, abs=2e-3, rel=1e-5)
        assert o["metrics"]["acc"] == t["acc"], t["doc_id"]
        if "acc_norm" in t:
            assert o["metrics"]["acc_norm"] == t["acc_norm"], t["doc_id"]
    assert ours.breakdown["subject"] == {subject: {"acc": ours.metrics["acc"]["value"], "n": n}}
