"""Tokens/s of a LoRA SFT step (forward + backward + AdamW) with and without WeMask, interleaved, in one run.

    OMP_NUM_THREADS=1 python bench/bench_finetune.py --model smollm2-135m --reps 4

The same batch of GSM8K train examples (chat template, right padding, loss on the solution tokens) is
trained repeatedly; each repetition runs one step without WeMask and one with it (order alternating), and the
median step time of each is reported. WeMask's ME layer comes from a scan of the same training-format text.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import melayer
from melayer.finetuning.data import load_records, plain_rows, training_texts
from melayer.finetuning.train import find_massive_token


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--rate", type=float, default=0.01)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from peft import LoraConfig, get_peft_model

    lm = melayer.load(args.model, progress=False)
    rows = plain_rows(load_records("gsm8k", "sft", limit=args.batch_size), "sft")
    texts = training_texts(lm.tokenizer, rows, chat=True, n=args.batch_size)
    me_layer, _ = find_massive_token(lm, texts)
    tok = lm.tokenizer
    tok.padding_side = "right"
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    tokens = int(batch["attention_mask"].sum())
    model = get_peft_model(lm.model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                task_type="CAUSAL_LM"))
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    wm = melayer.wemask(lm, args.rate, me_layer=me_layer)

    def step() -> float:
        t = time.perf_counter()
        loss = model(**batch, labels=labels, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    step()  # warm-up
    times: dict[str, list[float]] = {"off": [], "on": []}
    for rep in range(args.reps):
        for name in (("off", "on") if rep % 2 == 0 else ("on", "off")):
            if name == "on":
                with wm:
                    times[name].append(step())
            else:
                times[name].append(step())
            print(f"rep {rep} {name}: {times[name][-1]:.2f}s", file=sys.stderr, flush=True)
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    print(f"{lm.name}: batch {args.batch_size}, {tokens} tokens/step, LoRA r=16 all-linear, "
          f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, {args.threads} thread(s)")
    print(f"| WeMask | median s/step | tokens/s |\n|---|---|---|\n| off | {off:.2f} | {tokens / off:.1f} |\n"
          f"| rate {args.rate:g} ({wm.describe()}) | {on:.2f} | {tokens / on:.1f} |")
    cost = on / off - 1
    print(f"WeMask cost per step: {100 * cost:+.1f} % (target <= 3 %: {'PASS' if cost <= 0.03 else 'FAIL'})")
    print(f"command: {' '.join(['python', *sys.argv])}")


if __name__ == "__main__":
    main()
