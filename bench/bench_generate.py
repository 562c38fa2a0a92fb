"""Batched greedy generation: tokens/s at batch 8 (input order vs length-sorted) against batch 1.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_generate.py [--prompts 16] [--batch 8] [--new-tokens 32]
        [--singles 4] [--reps 3] [--threads 1]

The prompts are the first ``--prompts`` GSM8K test questions melayer ships (plain text, no chat template), of
uneven length. Every call generates exactly ``--new-tokens`` tokens (EOS suppressed), greedy, KV cache, so the
work per prompt is the same in every condition. In one process, interleaved, median of ``--reps``:
* batch 1: ``--singles`` prompts (spread over the length range) one at a time;
* batch ``--batch``, input order: consecutive prompts, left padded;
* batch ``--batch``, length-sorted: the batches :func:`melayer.capture.batching.plan_batches` picks for
  generation (similar lengths together, so little padding).
tokens/s = generated tokens / seconds. Target (issue 9): batch 8 >= 4x batch 1.

It also measures the ceiling that batching cannot pass on this machine: every ``nn.Linear`` of one decoding step
(each layer's projections and the LM head, at their own shapes) timed with 1 row and with ``--batch`` rows; the
ratio ``batch x time(1 row) / time(batch rows)`` is the most a decoding step at that batch can gain from sharing
the weights, whatever the generation loop does (the prefill of the prompts gains less: it is already a
matrix-matrix product at batch 1).
"""

from __future__ import annotations

import argparse
import json

import benchlib as B

THREADS = B.pin_threads()


def gsm8k_questions(n: int) -> list[str]:
    path = B.ROOT / "melayer/data/eval/gsm8k"
    files = sorted(path.glob("*test*.jsonl")) or sorted(path.glob("*.jsonl"))
    if not files:
        raise SystemExit(f"bench: no GSM8K jsonl under {path}")
    out = []
    with files[0].open() as fh:
        for line in fh:
            out.append("Question: " + json.loads(line)["question"] + "\nAnswer:")
            if len(out) == n:
                break
    return out


def matmul_ceiling(model, rows: int, reps: int = 5) -> tuple[float, float, float]:
    """(seconds of one decoding step's linear layers at 1 row, at ``rows`` rows, share of them in the LM head)."""
    import collections
    import time

    import torch

    shapes = collections.Counter(tuple(m.weight.shape) for m in model.modules() if isinstance(m, torch.nn.Linear))
    head = tuple(model.get_output_embeddings().weight.shape)

    def timed(w, x) -> float:
        torch.nn.functional.linear(x, w)
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            torch.nn.functional.linear(x, w)
            ts.append(time.perf_counter() - t0)
        return sorted(ts)[len(ts) // 2]

    one = many = head_one = 0.0
    with torch.no_grad():
        for shape, count in shapes.items():
            w = torch.randn(shape)
            t1, tn = timed(w, torch.randn(1, shape[1])), timed(w, torch.randn(rows, shape[1]))
            one, many = one + count * t1, many + count * tn
            if shape == head:
                head_one = count * t1
            del w
    return one, many, head_one / one


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--singles", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", default="gemma-3-270m")
    args = ap.parse_args()

    import torch

    import melayer
    from melayer.capture.batching import GENERATE, plan_batches
    from melayer.interventions.generate import greedy_generate

    lm = melayer.load(args.model, progress=False)
    prompts = gsm8k_questions(args.prompts)
    lens = B.n_tokens(lm.tokenizer, prompts)
    by_len = sorted(range(len(prompts)), key=lambda i: lens[i])
    step = max(1, (len(by_len) - 1) // max(1, args.singles - 1))
    singles = [prompts[i] for i in by_len[::step][: args.singles]]
    n = args.new_tokens

    def gen(texts: list[str]) -> None:
        greedy_generate(lm, texts, max_new_tokens=n, chat=False, stop_at_eos=False)

    in_order = [prompts[i: i + args.batch] for i in range(0, len(prompts), args.batch)]
    planned = [[prompts[i] for i in idx] for idx in plan_batches(lens, policy=GENERATE, max_batch=args.batch)]

    def pad_share(batches: list[list[str]]) -> float:
        total = real = 0
        for b in batches:
            ls = B.n_tokens(lm.tokenizer, b)
            total += max(ls) * len(ls)
            real += sum(ls)
        return 1 - real / total

    fns = {
        "batch 1": lambda: [gen([p]) for p in singles],
        f"batch {args.batch}, input order": lambda: [gen(b) for b in in_order],
        f"batch {args.batch}, length-sorted (plan_batches)": lambda: [gen(b) for b in planned],
    }
    counts = {"batch 1": len(singles) * n, f"batch {args.batch}, input order": len(prompts) * n,
              f"batch {args.batch}, length-sorted (plan_batches)": len(prompts) * n}
    pads = {"batch 1": 0.0, f"batch {args.batch}, input order": pad_share(in_order),
            f"batch {args.batch}, length-sorted (plan_batches)": pad_share(planned)}
    times = B.interleaved(fns, args.reps, log=B.say)
    tps = {k: counts[k] / B.med(v) for k, v in times.items()}
    base = tps["batch 1"]
    print(f"model {lm.name}; torch threads {torch.get_num_threads()}; {len(prompts)} GSM8K questions of "
          f"{min(lens)}-{max(lens)} tokens; {n} new tokens each (greedy, KV cache); median of {args.reps}")
    print(f"command: {B.command_line()}\n")
    print(B.table(["condition", "tokens/s", "x batch 1", "padding share of prompt positions"],
                  [[k, f"{v:.2f}", f"{v / base:.2f}", f"{pads[k]:.0%}"] for k, v in tps.items()]))
    best = max(v for k, v in tps.items() if k != "batch 1") / base
    print(f"\nbatch {args.batch} / batch 1: {best:.2f}x (target >= 4: {'PASS' if best >= 4 else 'FAIL'})")
    one, many, head = matmul_ceiling(lm.model, args.batch)
    print(f"matrix-product ceiling of one decoding step: 1 row {one * 1e3:.1f} ms ({head:.0%} in the LM head), "
          f"{args.batch} rows {many * 1e3:.1f} ms -> at most {args.batch * one / many:.2f}x from batching "
          f"{args.batch} rows on this machine with {torch.get_num_threads()} thread(s)")


if __name__ == "__main__":
    main()
