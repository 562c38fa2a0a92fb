"""The paper's claim as a paired experiment: LoRA SFT on GSM8K train without / with WeMask (same seed, same data
order), then each trained model evaluated without / with the mask (2 x 2) on held-out GSM8K test problems.

Primary endpoint: per-item teacher-forced NLL (nats per token) of the reference solution, given the question in
the training format (chat template) -- continuous and paired. Paired bootstrap 95 % CI and Wilcoxon
signed-rank p of the per-item difference. Secondary: strict accuracy (greedy, ``#### N`` / "The answer is"),
McNemar, on the matched conditions only (train and evaluate with the same setting).

    OMP_NUM_THREADS=1 python bench/finetune_paired.py --train 32 --test 40 --acc 16 --output out/paired

Everything goes to ``OUTPUT/paired.json`` (schema ``melayer.finetune_paired/1``) and per-item records to
``OUTPUT/items.jsonl``; the two runs' directories (adapter, wemask.json, train_log.jsonl) sit beside them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import melayer
from melayer.eval.answers import gsm8k_gold, gsm8k_score
from melayer.eval.data import gsm8k_test
from melayer.eval.stats import mcnemar, paired_bootstrap
from melayer.finetuning import finetune
from melayer.finetuning.data import gsm8k_prompt, gsm8k_solution
from melayer.interventions.generate import greedy_generate
from melayer.util.io import write_json


@torch.no_grad()
def solution_nll(lm, items) -> list[float]:
    """Mean NLL per token of each reference solution, teacher-forced after the chat-formatted question."""
    tok = lm.tokenizer
    out = []
    for it in items:
        user = [{"role": "user", "content": gsm8k_prompt(it["question"])}]
        full = user + [{"role": "assistant", "content": gsm8k_solution(it["answer"])}]
        prompt_ids = tok.apply_chat_template(user, tokenize=True, add_generation_prompt=True, return_dict=False)
        full_ids = tok.apply_chat_template(full, tokenize=True, return_dict=False)
        if hasattr(prompt_ids, "input_ids"):
            prompt_ids, full_ids = prompt_ids["input_ids"], full_ids["input_ids"]
        assert full_ids[:len(prompt_ids)] == prompt_ids, "chat template: prompt is not a prefix"
        ids = torch.tensor([full_ids], device=lm.device)
        logits = lm.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()
        logp = torch.log_softmax(logits[0, :-1], dim=-1)
        target = ids[0, 1:]
        nll = -logp.gather(1, target[:, None])[:, 0]
        out.append(float(nll[len(prompt_ids) - 1:].mean()))
    return out


def accuracy(lm, items, max_new_tokens: int) -> list[float]:
    scores = []
    for start in range(0, len(items), 8):
        chunk = items[start:start + 8]
        texts, _, _ = greedy_generate(lm, [gsm8k_prompt(it["question"]) for it in chunk],
                                      max_new_tokens=max_new_tokens, chat=True)
        scores.extend(gsm8k_score(t, gsm8k_gold(it["answer"]))["exact_match_strict"] for t, it in zip(texts, chunk))
    return scores


def wilcoxon_p(a, b) -> float | None:
    from scipy.stats import wilcoxon

    d = np.asarray(b) - np.asarray(a)
    if not np.any(d):
        return None
    return float(wilcoxon(d).pvalue)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--train", type=int, default=32, help="training examples (first N of GSM8K train)")
    ap.add_argument("--test", type=int, default=40, help="held-out GSM8K test items for the NLL endpoint")
    ap.add_argument("--acc", type=int, default=16, help="test items for strict accuracy (0: skip)")
    ap.add_argument("--max-new-tokens", type=int, default=192)
    ap.add_argument("--rate", type=float, default=0.01)
    ap.add_argument("--select", default="activation")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-length", type=int, default=384)
    ap.add_argument("--output", default="out/paired")
    ap.add_argument("--baseline-only", action="store_true",
                    help="train only the run without WeMask (with another --seed: the noise floor)")
    ap.add_argument("--against", help="items.jsonl of an earlier run: compare this run's plain/nomask NLL with its "
                                      "plain/nomask, item by item (seed-to-seed noise floor)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    test = gsm8k_test()
    items = test[: args.test]
    t0 = time.time()
    runs = {}
    nll: dict[str, list[float]] = {}
    acc: dict[str, list[float]] = {}
    mask_settings = None
    plan = (("plain", 0.0),) if args.baseline_only else (("plain", 0.0), ("wemask", args.rate))
    for name, rate in plan:
        lm = melayer.load(args.model, progress=False)
        res = finetune(lm=lm, model=args.model, data="gsm8k", limit=args.train, wemask=rate, select=args.select,
                       learning_rate=args.lr, per_device_train_batch_size=args.batch_size, seed=args.seed,
                       max_length=args.max_length, num_train_epochs=1, gradient_checkpointing=False, save_steps=10_000, output=str(out / name),
                       progress=False)
        d = res.to_dict()
        runs[name] = {k: d[k] for k in ("steps", "train_loss", "final_loss", "runtime_s", "tokens", "tokens_per_s",
                                        "wemask", "massive_token")}
        print(f"[{time.time() - t0:6.0f}s] trained {name}: {d['steps']} steps, loss {d['train_loss']:.4f}, "
              f"{d['runtime_s']:.0f}s", flush=True)
        if rate > 0:
            w = d["wemask"]
            mask_settings = dict(rate=w["rate"], layers=w["layers"], select=w["select"], gamma=w["gamma"])
        lm.model.eval()
        for ev in ("nomask", "mask"):
            if ev == "mask":
                if mask_settings is None:  # the plain run comes first: get the settings the WeMask run will use
                    continue
                with melayer.wemask(lm, **mask_settings):
                    nll[f"{name}/{ev}"] = solution_nll(lm, items)
            else:
                nll[f"{name}/{ev}"] = solution_nll(lm, items)
            print(f"[{time.time() - t0:6.0f}s] NLL {name}/{ev}: {np.mean(nll[f'{name}/{ev}']):.4f}", flush=True)
        if args.acc:
            ev = "mask" if rate > 0 else "nomask"
            if rate > 0:
                with melayer.wemask(lm, **mask_settings):
                    acc[f"{name}/{ev}"] = accuracy(lm, test[: args.acc], args.max_new_tokens)
            else:
                acc[f"{name}/{ev}"] = accuracy(lm, test[: args.acc], args.max_new_tokens)
            print(f"[{time.time() - t0:6.0f}s] acc {name}/{ev}: {np.mean(acc[f'{name}/{ev}']):.3f}", flush=True)
        runs[name]["model"] = lm
    lm_plain = runs["plain"].pop("model")
    if not args.baseline_only:  # the plain model evaluated with the mask (settings known after the WeMask scan)
        lm_plain.model.eval()
        with melayer.wemask(lm_plain, **mask_settings):
            nll["plain/mask"] = solution_nll(lm_plain, items)
        runs["wemask"].pop("model")
        print(f"[{time.time() - t0:6.0f}s] NLL plain/mask: {np.mean(nll['plain/mask']):.4f}", flush=True)
    if args.against:
        earlier = [json.loads(line) for line in Path(args.against).read_text().splitlines()]
        nll["earlier/plain/nomask"] = [r["plain/nomask"] for r in earlier][: len(items)]

    def compare(a: str, b: str) -> dict:
        return {"a": a, "b": b, "mean_a": float(np.mean(nll[a])), "mean_b": float(np.mean(nll[b])),
                **paired_bootstrap("mean", nll[a], nll[b]), "wilcoxon_p": wilcoxon_p(nll[a], nll[b]),
                "b_better_share": float(np.mean(np.asarray(nll[b]) < np.asarray(nll[a])))}

    comparisons = {} if args.baseline_only else {
        "train effect, matched eval (wemask/mask vs plain/nomask)": compare("plain/nomask", "wemask/mask"),
        "train effect, eval without mask (wemask/nomask vs plain/nomask)": compare("plain/nomask", "wemask/nomask"),
        "train effect, eval with mask (wemask/mask vs plain/mask)": compare("plain/mask", "wemask/mask"),
        "eval mask on the plain-trained model (plain/mask vs plain/nomask)": compare("plain/nomask", "plain/mask"),
    }
    if args.against:
        comparisons["seed noise floor (this run's plain vs the earlier run's plain)"] = compare(
            "earlier/plain/nomask", "plain/nomask")
    result = {"schema": "melayer.finetune_paired/1", "model": args.model, "args": vars(args),
              "endpoint": "mean NLL per token (nats) of the reference solution, teacher-forced; lower is better",
              "test_items": len(items), "runs": runs,
              "nll_means": {k: float(np.mean(v)) for k, v in nll.items()}, "comparisons": comparisons,
              "accuracy": {k: {"n": len(v), "strict": float(np.mean(v))} for k, v in acc.items()},
              "wall_s": time.time() - t0}
    if len(acc) == 2:
        result["accuracy_mcnemar"] = mcnemar(acc["plain/nomask"], acc["wemask/mask"])
    with open(out / "items.jsonl", "w") as fh:
        for i in range(len(items)):
            fh.write(json.dumps({"index": i, **{k: v[i] for k, v in nll.items()}}) + "\n")
    write_json(out / "paired.json", result)
    print(json.dumps({k: result[k] for k in ("nll_means", "comparisons", "accuracy", "wall_s")}, indent=1, default=str))


if __name__ == "__main__":
    main()
