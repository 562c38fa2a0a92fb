"""Warm and cold start to the first scan result, with where the time goes.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_start.py [--warm 3] [--cold 1] [--threads 1] [--model gemma-3-270m]

* warm start: a fresh Python process that loads the model from melayer's cache and scans one prompt, timed by
  this script from the process start to the printed result (median of ``--warm`` processes). Target: <= 5 s.
  The child reports its phases: interpreter + ``import melayer``, ``melayer.load`` (tokenizer, model), the scan.
* cold start: the same with an empty ``MELAYER_CACHE`` (assemble the GGUF from its package, convert it once:
  read the GGUF metadata, rebuild the tokenizer, dequantise the weights, save; then scan). The phases come from
  melayer's own conversion (``melayer.models.convert.convert_timings``, when present). Target: 2x faster than
  before issue 9: ``--baseline DIR`` also times the cold start of the melayer checkout in DIR (e.g. a
  ``git worktree`` of an older commit), alternating with this one.
Each start runs in its own process; the phases are wall-clock seconds inside it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import benchlib as B

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import melayer
t1 = time.perf_counter()
lm = melayer.load(MODEL, progress=False)
t2 = time.perf_counter()
r = melayer.scan(lm, 'My favorite color is Dark Blue.', progress=False)
t3 = time.perf_counter()
from melayer.models import loading
try:
    from melayer.models.convert import convert_timings as phases
except ImportError:  # before issue 9
    phases = {}
print(json.dumps({"import": t1 - t0, "load": t2 - t1, "scan": t3 - t2, "phases": phases, "me_layer": r.me_layer}))
"""


def start(model: str, env: dict[str, str], threads: int, code_dir: str | None = None) -> dict:
    code = f"import torch; torch.set_num_threads({threads})\nMODEL = {model!r}\n" + CHILD
    t0 = time.perf_counter()
    if code_dir:
        env = {**env, "PYTHONPATH": code_dir}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False,
                         cwd=code_dir or None)
    total = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"child failed:\n{out.stderr[-3000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["total"] = total
    res["stderr"] = out.stderr
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--warm", type=int, default=3, help="warm-start processes (median)")
    ap.add_argument("--cold", type=int, default=1, help="cold-start processes (0: skip)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--baseline", metavar="DIR", help="also time the cold start of the melayer checkout in DIR")
    args = ap.parse_args()
    env = {**os.environ, "MELAYER_QUIET": "1", "OMP_NUM_THREADS": str(args.threads)}

    import melayer

    melayer.load(args.model, progress=False)  # the cache exists
    print(f"model {args.model}; torch threads {args.threads}; one fresh process per start")
    print(f"command: {B.command_line()}\n")
    rows = []
    warm = [start(args.model, env, args.threads) for _ in range(args.warm)]
    warm.sort(key=lambda r: r["total"])
    w = warm[len(warm) // 2]
    rows.append(["warm start to the first scan result (median process)", f"{w['total']:.2f}",
                 _phases(w), "PASS" if w["total"] <= 5 else "FAIL (target <= 5 s)"])
    for i in range(args.cold):
        runs = [("this checkout", None), ("baseline " + args.baseline, args.baseline)] if args.baseline else \
            [("this checkout", None)]
        if i % 2:
            runs.reverse()
        cold = {}
        for label, code_dir in runs:
            with tempfile.TemporaryDirectory() as tmp:
                cold[label] = c = start(args.model, {**env, "MELAYER_CACHE": tmp}, args.threads, code_dir)
            leak = [line for line in c["stderr"].splitlines() if "de-quantizing" in line or "it/s]" in line]
            rows.append([f"cold start, {label} (empty cache: assemble + convert + load + scan)", f"{c['total']:.2f}",
                         _phases(c) + f"; library progress-bar lines on stderr: {len(leak)}",
                         f"{c['total'] / w['total']:.1f}x warm"])
        if args.baseline:
            a, b = cold["this checkout"]["total"], cold["baseline " + args.baseline]["total"]
            rows.append(["cold start: baseline / this checkout", f"{b / a:.2f}x", "",
                         "PASS" if b / a >= 2 else "FAIL (target >= 2x)"])
    print(B.table(["start", "seconds", "phases (s)", "verdict"], rows))
    totals = ", ".join(f"{r['total']:.2f}" for r in warm)
    print(f"\nfirst result: ME layer {w['me_layer']}; warm totals: {totals}")
    print(f"warm start to the first scan result: {w['total']:.2f} s, median of {len(warm)} processes "
          f"(target <= 5 s: {'PASS' if w['total'] <= 5 else 'FAIL'})")


def _phases(r: dict) -> str:
    parts = [f"interpreter+import {r['total'] - r['load'] - r['scan']:.2f}", f"load {r['load']:.2f}",
             f"scan {r['scan']:.2f}"]
    parts += [f"{k} {v:.2f}" for k, v in r["phases"].items()]
    return "; ".join(parts)


if __name__ == "__main__":
    main()
