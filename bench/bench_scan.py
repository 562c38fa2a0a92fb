"""Benchmark: melayer.scan vs the bare decoder forward, and cold vs warm start, on the embedded default.

    .venv/bin/python bench/bench_scan.py [--reps 5] [--skip-cold]

* scan / bare: the same prompts (the 111 shipped ones), the same batches (8, left padded), the same
  process; bare = the decoder stack alone (no LM head, no hidden-state outputs, no hooks). Runs are
  interleaved and the median of ``--reps`` is reported. Target: ratio <= 1.10.
* warm start: a fresh Python process that loads Gemma-3-270M from melayer's cache and scans one prompt,
  timed from process start to the printed result. Target: <= 5 s.
* cold start: the same with an empty MELAYER_CACHE (assembles the GGUF, rebuilds the tokenizer,
  dequantises, saves the cache).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

FIRST_RESULT = (
    "import melayer; lm = melayer.load(progress=False); "
    "r = melayer.scan(lm, 'My favorite color is Dark Blue.', progress=False); print('me_layer', r.me_layer)"
)


def start_time(env: dict[str, str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", FIRST_RESULT], env=env, capture_output=True, text=True, check=True)
    return time.perf_counter() - t0, out.stdout.strip().splitlines()[-1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--skip-cold", action="store_true")
    args = ap.parse_args()

    import torch

    import melayer
    from melayer.analysis.scan import default_prompts
    from melayer.capture import batches, encode, forward_body

    env = {**os.environ, "MELAYER_QUIET": "1"}
    lm = melayer.load(progress=False)  # make sure the cache exists
    prompts = default_prompts()
    encoded = [encode(lm, chunk) for _, chunk in batches(prompts, 8)]

    def bare() -> None:
        with torch.no_grad():
            for batch in encoded:
                forward_body(lm, batch)

    def scan() -> None:
        melayer.scan(lm, prompts, batch_size=8, progress=False)

    bare(), scan()  # warm-up
    t_bare, t_scan = [], []
    for _ in range(args.reps):
        for fn, acc in ((bare, t_bare), (scan, t_scan)):
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    mb, ms = statistics.median(t_bare), statistics.median(t_scan)
    print(f"model: {lm.name}; {len(prompts)} prompts, batch 8, torch threads {torch.get_num_threads()}")
    print("| measurement | seconds | ratio |")
    print("|---|---|---|")
    print(f"| bare decoder forward (median of {args.reps}) | {mb:.2f} | 1.00 |")
    print(f"| melayer.scan (median of {args.reps}) | {ms:.2f} | {ms / mb:.3f} (target <= 1.10) |", flush=True)

    warm = [start_time(env) for _ in range(3)]
    w = statistics.median(t for t, _ in warm)
    print(f"| warm start to first scan result (median of 3 processes) | {w:.2f} | target <= 5 s |", flush=True)
    if not args.skip_cold:
        with tempfile.TemporaryDirectory() as tmp:
            cold = start_time({**env, "MELAYER_CACHE": tmp})
        print(f"| cold start to first scan result (empty cache) | {cold[0]:.2f} | {cold[0] / w:.1f}x warm |")
    print(f"first result: {warm[0][1]}")


if __name__ == "__main__":
    main()
