"""Benchmark: melayer.scan vs the bare decoder forward (and TransformerLens) on short and real-length prompts.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_scan.py [--sets short,wiki,long] [--reps 3] [--threads 1]
        [--long 1024,2048,4096] [--paths bare1,bare8,plan,scan,scan1,tl,tlplan] [--no-tl] [--profile SET]

Prompt sets (token counts include BOS):
* ``short``: the 111 shipped prompts (5-40 tokens);
* ``wiki``: the first 8 WikiText-2 test paragraphs of 300-4,096 tokens (file order);
* ``long``: running WikiText-2 text cut to ``--long`` tokens (one prompt per length; 4,096 is the sequence
  length Sun et al. scan).
WikiText-2 is read from ``$MELAYER_WIKITEXT`` or ``shared/data/wikitext2/wiki.test.raw``; without it the
excerpt melayer ships (~2.7k tokens) is used and ``long`` lengths beyond it fail.

Paths, all on the same prompts in one process, interleaved (the order rotates every round), median of ``--reps``:
* bare forward, one prompt at a time: the decoder stack alone (no LM head, no hooks, no hidden-state outputs);
* bare forward, left-padded batches of 8 in input order (what scan did before issue 9);
* bare forward over melayer's own batches (``melayer.capture.plan_batches``, when present);
* ``melayer.scan`` with its defaults, and with ``batch_size=1``;
* TransformerLens ``run_with_cache`` keeping only ``hook_resid_post`` (+ the per-token max |a|), one prompt at a
  time (``tl``) and over melayer's own batches, left padded with the mask and positions (``tlplan``), when
  TransformerLens is importable (installed by ``make setup``; ``$MELAYER_BENCH_TL`` is searched first).
  The verdict takes TransformerLens's faster path.
Ratios are to the fastest bare forward of that set, of the medians and of the best runs (on a loaded machine
the best of each is the steadier estimate of what a path costs). Targets (issue 9): scan <= 1.10x; TransformerLens >= 3x scan.
"""

from __future__ import annotations

import argparse
import sys

import benchlib as B

THREADS = B.pin_threads()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default="short,wiki,long")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch/OMP threads (default 1)")
    ap.add_argument("--long", default="1024,2048,4096", help="token lengths of the 'long' set")
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--no-tl", action="store_true", help="skip TransformerLens")
    ap.add_argument("--profile", metavar="SET", help="instead of timing: cProfile melayer.scan on SET")
    ap.add_argument("--paths", default="bare1,bare8,plan,scan,scan1,tl",
                    help="paths to time: bare1 (one at a time), bare8 (padded batches of 8), plan (bare over melayer's "
                         "batches), scan, scan1 (batch_size=1), tl (TransformerLens, one prompt at a time), tlplan "
                         "(TransformerLens over melayer's batches)")
    args = ap.parse_args()

    import torch

    import melayer

    lm = melayer.load(args.model, progress=False)
    tok = lm.tokenizer
    sets = {}
    for name in args.sets.split(","):
        if name == "short":
            from melayer.analysis.scan import default_prompts

            sets[name] = default_prompts()
        elif name == "wiki":
            sets[name] = B.wiki_paragraphs(tok, 8)
        elif name == "long":
            sets[name] = B.wiki_long(tok, [int(x) for x in args.long.split(",")])
        else:
            raise SystemExit(f"unknown set {name!r}")

    if args.profile:
        profile(lm, sets[args.profile])
        return

    plan = None
    try:  # melayer's batching helper (issue 9); absent before it
        from melayer.capture.batching import plan_batches as plan
    except ImportError:
        pass
    skip_tl = args.no_tl or not {"tl", "tlplan"} & set(args.paths.split(","))
    bridge, tl_note = (None, "skipped") if skip_tl else B.transformer_lens(lm.source)
    print(f"model {lm.name}; torch threads {torch.get_num_threads()}; {B.wikitext_path()}; "
          f"TransformerLens: {tl_note if bridge is None else tl_note + ' (TransformerBridge, eager attention)'}")
    print(f"command: {B.command_line()}\n")

    for name, prompts in sets.items():
        lens = B.n_tokens(tok, prompts)
        rows = B.encode_rows(lm, prompts)
        padded = B.encode_padded(lm, prompts, 8)
        want = set(args.paths.split(","))
        fns = {}
        if "bare1" in want:
            fns["bare, one prompt at a time"] = lambda rows=rows: B.bare_forward(lm, rows)
        if "bare8" in want:
            fns["bare, left-padded batches of 8 (input order)"] = lambda padded=padded: B.bare_forward(lm, padded)
        planned = list(_planned(lm, prompts, plan)) if plan is not None and {"plan", "tlplan"} & want else None
        if planned is not None and "plan" in want:
            fns["bare, melayer's batches (plan_batches)"] = lambda planned=planned: B.bare_forward(lm, planned)
        fns["melayer.scan (defaults)"] = lambda prompts=prompts: melayer.scan(lm, prompts, progress=False)
        if "scan1" in want:
            fns["melayer.scan(batch_size=1)"] = lambda prompts=prompts: melayer.scan(lm, prompts, batch_size=1,
                                                                                       progress=False)
        if bridge is not None and "tl" in want:
            fns["TransformerLens run_with_cache (resid_post)"] = lambda rows=rows: B.tl_resid_scan(bridge, rows)
        if bridge is not None and planned is not None and "tlplan" in want:
            fns["TransformerLens run_with_cache (resid_post), melayer's batches"] = (
                lambda planned=planned: B.tl_resid_scan(bridge, planned))
        B.say(f"[{name}] {len(prompts)} prompts, {sum(lens)} tokens")
        times = B.interleaved(fns, args.reps, log=lambda m, name=name: B.say(f"[{name}] {m}"),
                              warmup=max(lens) <= 1024)
        meds = {k: B.med(v) for k, v in times.items()}
        fastest_bare = min(v for k, v in meds.items() if k.startswith("bare"))
        print(f"### {name}: {len(prompts)} prompts of {min(lens)}-{max(lens)} tokens ({sum(lens)} in all), "
              f"median of {args.reps}")
        mins = {k: min(v) for k, v in times.items()}
        fastest_min = min(v for k, v in mins.items() if k.startswith("bare"))
        table_rows = [[k, f"{v:.2f}", f"{v / fastest_bare:.2f}", f"{mins[k]:.2f}", f"{mins[k] / fastest_min:.2f}"]
                      for k, v in meds.items()]
        print(B.table(["path", "seconds (median)", "ratio to the fastest bare (medians)", "seconds (best)",
                       "ratio (best of each)"], table_rows))
        scan = meds["melayer.scan (defaults)"]
        verdict = f"melayer.scan / fastest bare = {scan / fastest_bare:.3f} (target <= 1.10: " \
                  f"{'PASS' if scan / fastest_bare <= 1.10 else 'FAIL'})"
        tls = [v for k, v in meds.items() if k.startswith("TransformerLens")]
        if tls:  # TransformerLens's fastest path: one prompt at a time or melayer's batches
            tl = min(tls)
            verdict += f"; fastest TransformerLens / melayer.scan = {tl / scan:.2f}x (target >= 3: " \
                       f"{'PASS' if tl / scan >= 3 else 'FAIL'})"
        print(verdict + "\n", flush=True)


def _planned(lm, prompts, plan):
    """Encode ``prompts`` into the batches melayer's planner picks (bare forward over melayer's batching)."""
    from melayer.capture import left_pad

    rows = [lm.tokenizer(p)["input_ids"] for p in prompts]
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    for idx in plan([len(r) for r in rows], device=lm.device):
        b = left_pad([rows[i] for i in idx], pad)
        yield {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}


def profile(lm, prompts) -> None:
    import cProfile
    import pstats

    import melayer

    melayer.scan(lm, prompts[:2], progress=False)
    prof = cProfile.Profile()
    prof.enable()
    melayer.scan(lm, prompts, progress=False)
    prof.disable()
    pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(30)


if __name__ == "__main__":
    main()
