"""Cost of each registered intervention in greedy KV-cached generation, relative to no intervention.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_methods.py [--model smollm2-135m] [--reps 3] [--new-tokens 32]

One process, the same prompt (batch 1, exactly ``--new-tokens`` tokens, EOS suppressed); every condition is bound
once (calibration excluded from the timing) and the conditions are interleaved in every round (order rotating).
The cost is the median over rounds of (time under the method / time without) - 1, so load drifts on a shared
machine cancel within a round; the spread (quartiles of the per-round ratios), the thread count and the
1-minute load average before and after are printed with the table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from benchlib import command_line, interleaved, pin_threads, say, table

METHODS = ["wemask:rate=0.01", "wemask_before:rate=0.01", "wemask_random_dims:rate=0.01",
           "wemask_other_token:rate=0.01", "wemask_me_only:rate=0.01", "act", "act:heads=all", "zerotuning",
           "set_mean", "set_zero"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--methods", default=",".join(METHODS).replace(",", " "), help="space-separated method specs")
    ap.add_argument("--threads", type=int, default=1, help="torch / BLAS threads (pinned before torch loads)")
    args = ap.parse_args()
    threads = pin_threads()
    load_before = os.getloadavg()[0]

    import melayer
    from melayer.interventions.generate import greedy_generate
    from melayer.interventions.methods import Calibration, parse_method

    lm = melayer.load(args.model, progress=False)
    cal = Calibration(lm)
    bound = {}
    for text in args.methods.split():
        t0 = time.perf_counter()
        bound[text] = parse_method(text).bind(lm, cal)
        say(f"bound {text} in {time.perf_counter() - t0:.1f}s: {bound[text].describe()}")
    prompt = ["The capital of France is"]

    def gen(iv=None):
        def fn():
            if iv is None:
                greedy_generate(lm, prompt, max_new_tokens=args.new_tokens, chat=False, stop_at_eos=False)
            else:
                with iv:
                    greedy_generate(lm, prompt, max_new_tokens=args.new_tokens, chat=False, stop_at_eos=False)
        return fn

    fns = {"none": gen(), **{k: gen(v) for k, v in bound.items()}}
    times = interleaved(fns, args.reps, log=say)
    rows = []
    for name in bound:
        ratios = sorted(t / b - 1 for t, b in zip(times[name], times["none"]))
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        rows.append([name, f"{args.new_tokens / statistics.median(times[name]):.1f}",
                     f"{statistics.median(ratios) * 100:+.1f} %", f"{q[0] * 100:+.1f} % .. {q[2] * 100:+.1f} %"])
    print(f"model {lm.name}, batch 1, {args.new_tokens} new tokens, KV cache, {args.reps} interleaved rounds, "
          f"{threads} thread(s), 1-min load average {load_before:.1f} before / {os.getloadavg()[0]:.1f} after on "
          f"{os.cpu_count()} CPUs; no intervention: {args.new_tokens / statistics.median(times['none']):.1f} tokens/s\n")
    print(table(["method", "tokens/s", "cost vs none (paired median)", "per-round quartiles"], rows))
    print(f"\ncommand: {command_line()}")



if __name__ == "__main__":
    main()
