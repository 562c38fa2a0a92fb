"""acc / acc_norm / acc_bytes agree with lm-eval's HFLM run on lm-eval's own task definitions (issue 8, item 3).

lm-eval's arc_easy and hellaswag YAMLs are loaded from the installed lm-eval (with their doc_to_text,
doc_to_choice, process_docs and process_results); only the dataset source is pointed at melayer's vendored
data, converted to the Hugging Face layout those tasks read. Both sides score the same tiny real checkpoint.
"""

from __future__ import annotations

import json
from importlib import resources

import pytest

from melayer.eval import data as D
from melayer.eval import run
from melayer.testing import tiny_lm

N = 40


def _arc_docs(n: int) -> list[dict]:
    out = []
    for d in D.arc("easy")[:n]:
        q = d["question"]
        out.append({"id": d["id"], "question": q["stem"], "answerKey": d["answerKey"],
                    "choices": {"text": [c["text"] for c in q["choices"]], "label": [c["label"] for c in q["choices"]]}})
    return out


def _hellaswag_docs(n: int) -> list[dict]:
    # the vendored text is already preprocessed and joins ctx_a/ctx_b; lm-eval's process_docs rebuilds the same
    # query from activity_label + ": " + ctx_a (+ " " + an empty ctx_b, stripped)
    out = []
    for i, d in enumerate(D.hellaswag()[:n]):
        label, ctx = d["ctx"].split(": ", 1)
        out.append({"ind": i, "activity_label": label, "ctx_a": ctx, "ctx_b": "", "ctx": ctx,
                    "endings": d["endings"], "label": str(d["label"]), "split": "val", "split_type": "indomain",
                    "source_id": f"v{i}"})
    return out


def _lm_eval_task(name: str, yaml_rel: str, docs: list[dict], tmp_path):
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(str(resources.files("lm_eval") / "tasks" / yaml_rel))
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    cfg.update(task=f"melayer_check_{name}", dataset_path="json", dataset_name=None,
               dataset_kwargs={"data_files": {"validation": str(path)}}, training_split=None,
               validation_split="validation", test_split=None, fewshot_split=None)
    cfg.pop("tag", None)
    cfg["metric_list"] = [*cfg["metric_list"], {"metric": "acc_bytes", "aggregation": "mean", "higher_is_better": True}]
    return ConfigurableTask(config=cfg)


@pytest.mark.parametrize("name,yaml_rel,docs", [("arc_easy", "arc/arc_easy.yaml", _arc_docs),
                                                ("hellaswag", "hellaswag/hellaswag.yaml", _hellaswag_docs)])
def test_acc_norm_agrees_with_lm_eval_hflm(name, yaml_rel, docs, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = tiny_lm("llama")
    task = _lm_eval_task(name, yaml_rel, docs(N), tmp_path)
    # HFLM's max_length is the config's 256 positions: longer inputs lose their start on both sides (lm-eval's rule)
    ref = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=8)
    assert ref.max_length == lm.max_positions == 256
    res = lm_eval.simple_evaluate(model=ref, tasks=[task], log_samples=True, bootstrap_iters=0)
    theirs = sorted(res["samples"][task.config.task], key=lambda s: s["doc_id"])
    ours = run(lm, name, limit=N, batch_size=8, progress=False).records
    assert len(theirs) == len(ours) == N
    for t, o in zip(theirs, ours):
        ll = [float(r[0]) for r in t["filtered_resps"]]
        assert o["logliks"] == pytest.approx(ll, abs=2e-3, rel=1e-5)
        assert (o["metrics"]["acc"], o["metrics"]["acc_norm"]) == (t["acc"], t["acc_norm"]), t["doc_id"]
        assert o["metrics"]["acc_bytes"] == t["acc_bytes"], t["doc_id"]
