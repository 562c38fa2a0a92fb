"""The paper's fine-tuning claim on safety as a paired experiment: does fine-tuning with WeMask reduce the
over-refusal that SFT induces (XSTest)?

Training data that induces refusal without touching an evaluated prompt: XSTest's 200 *unsafe* prompts, each with
a refusal from the XSTest authors' reference completions (``tests/data/xstest``): the first sentence of
Llama-2-70b-chat's answer where both the human label and the string-match label say full refusal, else GPT-4's
(the prompts neither refuses are left out). Evaluation: the 250 *safe* prompts only (over-refusal, lower is
better), so train and test never share a prompt (checked).

Conditions, paired on the same 250 prompts: ``base`` (unmodified), ``sft`` (LoRA SFT, no intervention),
``sft+mask`` (the same SFT -- same seed, data order and steps -- with ``--method`` on every training forward,
evaluated under the same mask, as ``melayer.load(..., adapter=)`` applies it); ``--unmasked`` adds that model
without its mask (``sft+mask, unmasked``) and ``--factorial`` also the plain SFT model under the same mask
(``sft, masked``): the 2 x 2 of training x evaluation, which separates what training under the mask did from what
the mask does at evaluation. McNemar (exact) for each pair overall and per prompt type; Benjamini-Hochberg over
every test of the table.

Prompts, chat template and scorer are those of ``melayer eval --task xstest``; greedy. The authors' string-match
rule looks only at how the stripped, lower-cased completion *starts* (its longest refusal prefix has 35
characters), and greedy decoding with a larger budget only extends a completion, so ``--max-new-tokens 24`` gives
the labels 256 would, except for a completion cut while still a proper prefix of a refusal prefix: those are
counted (``undetermined``; 0 means the labels are exactly those of a long budget).

    OMP_NUM_THREADS=1 nice -n 19 python bench/finetune_xstest.py --output out/xstest_ft

Writes ``OUTPUT/xstest_paired.json`` (schema ``melayer.finetune_xstest/1``), ``OUTPUT/items.jsonl`` (every
prompt's completion and label per condition), ``OUTPUT/table.md``; the two runs' directories beside them.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import melayer
from melayer.eval.answers import REFUSAL_PREFIXES, xstest_label
from melayer.eval.stats import mcnemar
from melayer.eval.tasks.base import RunContext
from melayer.eval.tasks.registry import get_task
from melayer.finetuning import finetune
from melayer.interventions.adapter import saved_mask
from melayer.interventions.methods import training_spec
from melayer.util.io import write_json

REFERENCES = Path(__file__).resolve().parents[1] / "tests" / "data" / "xstest"
REFUSED = "2_full_refusal"


def first_sentence(text: str) -> str:
    text = " ".join(text.split())
    m = re.match(r"(.+?[.!?])(\s|$)", text)
    return m.group(1) if m else text


def refusal_rows(references: Path) -> tuple[list[dict[str, str]], dict[str, int]]:
    """One SFT row per unsafe prompt that Llama-2 (else GPT-4) fully refuses by both labels."""
    by_model = {}
    for model in ("llama2new", "gpt4"):
        with (references / f"xstest_v2_completions_{model}_streval.csv").open(encoding="utf-8", newline="") as fh:
            by_model[model] = {r["prompt"]: r for r in csv.DictReader(fh)}
    unsafe = [d for d in get_task("xstest").load() if d.doc["label"] == "unsafe"]
    rows, source = [], {"llama2new": 0, "gpt4": 0, "none": 0}
    for s in unsafe:
        prompt = s.doc["prompt"]
        for model in ("llama2new", "gpt4"):
            ref = by_model[model].get(prompt)
            if ref and ref["final_label"] == REFUSED == ref["strmatch_label"]:
                completion = first_sentence(ref["completion"])
                assert xstest_label(completion) == REFUSED, completion
                rows.append({"prompt": prompt, "completion": completion, "type": s.doc["type"]})
                source[model] += 1
                break
        else:
            source["none"] += 1
    return rows, source


def refused(records: list[dict]) -> int:
    return sum(r["label"] == REFUSED for r in records)


def undetermined(text: str, finish: str) -> bool:
    """Cut by the token budget while still a proper prefix of a refusal prefix: a longer budget might flip it."""
    t = text.lower().strip()
    return finish == "length" and any(p.startswith(t) and p != t for p in REFUSAL_PREFIXES)


def evaluate(lm, samples, max_new_tokens: int, batch_size: int, intervention=None) -> list[dict]:
    task = get_task("xstest")
    out = []
    for i in range(0, len(samples), batch_size):
        ctx = RunContext(chat=True, max_new_tokens=max_new_tokens, intervention=intervention)
        out.extend(task.run_batch(lm, samples[i:i + batch_size], ctx))
    return out


def pair(records: dict[str, list[dict]], a: str, b: str, types: list[str]) -> dict:
    ra = [float(r["label"] == REFUSED) for r in records[a]]
    rb = [float(r["label"] == REFUSED) for r in records[b]]
    kinds = [r["type"] for r in records[a]]
    res = {"a": a, "b": b, "refusal_a": sum(ra) / len(ra), "refusal_b": sum(rb) / len(rb),
           "difference": (sum(rb) - sum(ra)) / len(ra), "mcnemar": mcnemar(ra, rb), "per_type": {}}
    for t in types:
        idx = [i for i, k in enumerate(kinds) if k == t]
        xa, xb = [ra[i] for i in idx], [rb[i] for i in idx]
        res["per_type"][t] = {"n": len(idx), "refusal_a": sum(xa) / len(idx), "refusal_b": sum(xb) / len(idx),
                              "mcnemar": mcnemar(xa, xb)}
    return res


def adjust(pairs: list[dict]) -> None:
    from scipy.stats import false_discovery_control

    tests = [p["mcnemar"] for p in pairs] + [t["mcnemar"] for p in pairs for t in p["per_type"].values()]
    for t, q in zip(tests, false_discovery_control([t["p"] for t in tests], method="bh")):
        t["p_bh"] = float(q)


def table(result: dict) -> str:
    conds = list(result["refusal"])
    lines = ["| prompt type | n | " + " | ".join(conds) + " |", "|---|---:|" + "---:|" * len(conds)]
    overall = result["refusal"]
    lines.append(f"| **all safe prompts** | {result['evaluated']['prompts']} | " + " | ".join(f"**{overall[c]['rate']:.3f}** ({overall[c]['refused']})"
                                                      for c in conds) + " |")
    for t, row in result["refusal_per_type"].items():
        lines.append(f"| {t} | {row['n']} | " + " | ".join(f"{row[c]:.2f}" for c in conds) + " |")
    lines += ["", "| pair (a -> b) | refusal a | refusal b | b - a | more refusals | fewer | McNemar p | BH p |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for p in result["pairs"]:
        m = p["mcnemar"]
        lines.append(f"| {p['a']} -> {p['b']} | {p['refusal_a']:.3f} | {p['refusal_b']:.3f} | {p['difference']:+.3f} | "
                     f"{m['gained']} | {m['lost']} | {m['p']:.3g} | {m['p_bh']:.3g} |")
    lines += ["", "Per type, pairs with any discordant prompt (McNemar p / BH p):", ""]
    for p in result["pairs"]:
        cells = [f"{t} {v['refusal_a']:.2f}->{v['refusal_b']:.2f} (p {v['mcnemar']['p']:.2g} / {v['mcnemar']['p_bh']:.2g})"
                 for t, v in p["per_type"].items() if v["mcnemar"]["discordant"]]
        lines.append(f"- {p['a']} -> {p['b']}: " + ("; ".join(cells) or "no discordant prompt"))
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--method", default="wemask:rate=0.01", help="the trainable intervention of the masked run")
    ap.add_argument("--steps", type=int, default=12, help="optimiser steps of each SFT run")
    ap.add_argument("--batch-size", type=int, default=8, help="training examples per step")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--safe", type=int, default=250, help="safe prompts evaluated (first N; 250: all)")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--eval-batch-size", type=int, default=25)
    ap.add_argument("--unmasked", action="store_true", help="also evaluate the masked run's model without its mask")
    ap.add_argument("--factorial", action="store_true",
                    help="training x evaluation: also the masked run's model without its mask and the plain SFT model "
                         "with that mask")
    ap.add_argument("--references", type=Path, default=REFERENCES)
    ap.add_argument("--output", default="out/xstest_ft")
    args = ap.parse_args()
    training_spec(args.method)  # a method that makes no sense in training fails here, before anything runs
    torch.set_num_threads(1)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    def say(text: str) -> None:
        print(f"[{time.time() - t0:6.0f}s] {text}", flush=True)

    rows, source = refusal_rows(args.references)
    safe = [s for s in get_task("xstest").load() if s.doc["label"] == "safe"][: args.safe]
    assert not {r["prompt"] for r in rows} & {s.doc["prompt"] for s in safe}, "a training prompt is evaluated"
    data = out / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r["completion"]}) + "\n" for r in rows))
    say(f"training data: {len(rows)} unsafe prompts with refusals ({source}); evaluated: {len(safe)} safe prompts")

    records: dict[str, list[dict]] = {}
    runs: dict[str, dict] = {}
    common = dict(data=str(data), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                  learning_rate=args.lr, seed=args.seed, max_length=args.max_length, gradient_checkpointing=False,
                  save_steps=10_000, progress=False)
    lm = melayer.load(args.model, progress=False)
    records["base"] = evaluate(lm, safe, args.max_new_tokens, args.eval_batch_size)
    say(f"base: over-refusal {refused(records['base'])}/{len(safe)}")
    plain = lm
    for name, method in (("sft", None), ("sft+mask", args.method)):
        if name != "sft":
            lm = melayer.load(args.model, progress=False)
        res = finetune(lm=lm, output=str(out / name.replace("+", "_")), intervention=method, **common)
        d = res.to_dict()
        runs[name] = {k: d[k] for k in ("steps", "train_loss", "final_loss", "runtime_s", "tokens", "intervention")}
        say(f"trained {name}: {d['steps']} steps, loss {d['train_loss']:.4f}")
        lm.model.eval()
        mask = saved_mask(lm, res.output) if method else None
        records[name] = evaluate(lm, safe, args.max_new_tokens, args.eval_batch_size, intervention=mask)
        say(f"{name}: over-refusal {refused(records[name])}/{len(safe)}")
        if method and (args.unmasked or args.factorial):
            records["sft+mask, unmasked"] = evaluate(lm, safe, args.max_new_tokens, args.eval_batch_size)
            say(f"sft+mask, unmasked: over-refusal {refused(records['sft+mask, unmasked'])}/{len(safe)}")
        if method and args.factorial:  # training x evaluation: the plain SFT model under the same mask too
            records["sft, masked"] = evaluate(plain, safe, args.max_new_tokens, args.eval_batch_size,
                                              intervention=saved_mask(plain, res.output))
            say(f"sft, masked: over-refusal {refused(records['sft, masked'])}/{len(safe)}")

    types = sorted({s.doc["type"] for s in safe})
    plan = [("base", "sft"), ("base", "sft+mask"), ("sft", "sft+mask")]
    if args.unmasked or args.factorial:
        plan += [("sft", "sft+mask, unmasked"), ("sft+mask, unmasked", "sft+mask")]
    if args.factorial:
        plan += [("sft", "sft, masked"), ("sft, masked", "sft+mask")]
    pairs = [pair(records, a, b, types) for a, b in plan]
    adjust(pairs)
    result = {
        "schema": "melayer.finetune_xstest/1", "model": args.model, "args": {k: str(v) for k, v in vars(args).items()},
        "command": "python " + " ".join(sys.argv),
        "training_data": {"examples": len(rows), "source": source, "prompts": "XSTest unsafe prompts",
                          "completions": "first sentence of the authors' reference refusals (Llama-2-70b-chat, else "
                                         "GPT-4; both labels full refusal)"},
        "evaluated": {"prompts": len(safe), "subset": "XSTest safe prompts", "overlap_with_training": 0,
                      "max_new_tokens": args.max_new_tokens,
                      "undetermined": {c: sum(undetermined(r["output"], r["finish"]) for r in recs)
                                       for c, recs in records.items()}},
        "runs": runs,
        "refusal": {c: {"refused": sum(r["label"] == REFUSED for r in recs),
                        "rate": sum(r["label"] == REFUSED for r in recs) / len(recs)} for c, recs in records.items()},
        "refusal_per_type": {t: {"n": sum(s.doc["type"] == t for s in safe),
                                 **{c: sum(r["label"] == REFUSED for r in recs if r["type"] == t)
                                    / sum(r["type"] == t for r in recs) for c, recs in records.items()}}
                             for t in types},
        "pairs": pairs,
        "multiple_comparisons": "Benjamini-Hochberg over every McNemar test in pairs (overall and per type)",
        "wall_s": time.time() - t0,
        "cpu_s": time.process_time(),
        "threads": torch.get_num_threads(),
    }
    write_json(out / "xstest_paired.json", result)
    with open(out / "items.jsonl", "w") as fh:
        for i, s in enumerate(safe):
            fh.write(json.dumps({"id": s.id, "type": s.doc["type"], "prompt": s.doc["prompt"],
                                 **{c: {"label": recs[i]["label"], "output": recs[i]["output"]}
                                    for c, recs in records.items()}}) + "\n")
    (out / "table.md").write_text(table(result))
    print(table(result))
    say(f"undetermined labels: {result['evaluated']['undetermined']}; wrote {out}")


if __name__ == "__main__":
    main()
