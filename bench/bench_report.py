"""``melayer report`` on a scan's output: fresh processes, with where the time goes.

    melayer scan --output out/scan        # the embedded Gemma-3-270M, the default prompts
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_report.py out/scan [--reps 3] [--baseline DIR]

Without a directory it scans first, into a temporary one (``melayer scan``: the embedded Gemma-3-270M, the
default prompts; not timed).

Each run is a fresh Python process that does what the ``melayer`` command does (import the CLI, run
``melayer report SCAN -o TMP/report.html``), timed by this script from the process start to its exit, less the
second page below (median of ``--reps``). The child reports its phases: interpreter + ``import melayer.cli``
(whether torch came with it), the page (reading the JSON, the figures, jinja2, and the imports they need), then
the same page again in that process (the figures and jinja2 alone; not part of the total). ``--baseline DIR``
times the checkout in DIR too (e.g. a ``git worktree`` of an older commit), alternating with this one, and
compares the pages' sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchlib as B

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
from melayer.cli import app
t1 = time.perf_counter()
torch = "torch" in sys.modules
try:
    app([sys.argv[1], sys.argv[2], "-o", sys.argv[3]], standalone_mode=False)
except SystemExit:
    pass
t2 = time.perf_counter()
from melayer.reporting.page import html
html(sys.argv[2], output=sys.argv[3])  # the same page again, every import done: the figures and jinja2 alone
t3 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "page": t2 - t1, "again": t3 - t2, "torch": torch}))
"""


def run(scan: str, env: dict[str, str], code_dir: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "report.html"
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, "-c", CHILD, "report", scan, str(out)], env={**env, "PYTHONPATH": code_dir},
                             cwd=code_dir, capture_output=True, text=True, check=False)
        total = time.perf_counter() - t0
        if res.returncode != 0 or not out.is_file():
            raise SystemExit(f"child failed:\n{res.stderr[-3000:]}")
        r = json.loads(res.stdout.strip().splitlines()[-1])
        r["total"], r["bytes"] = total - r["again"], out.stat().st_size
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scan", nargs="?", help="a directory written by melayer scan (default: scan now, untimed)")
    ap.add_argument("--reps", type=int, default=3, help="processes per checkout (median)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--baseline", metavar="DIR", help="also time the melayer checkout in DIR, alternating")
    args = ap.parse_args()
    env = {**os.environ, "MELAYER_QUIET": "1", "OMP_NUM_THREADS": str(args.threads),
           "MKL_NUM_THREADS": str(args.threads)}
    with tempfile.TemporaryDirectory() as tmp:
        args.label = args.scan or "SCAN (the embedded Gemma-3-270M's `melayer scan`, into a temporary directory)"
        if args.scan is None:
            args.scan = str(Path(tmp) / "scan")
            subprocess.run([sys.executable, "-c", "from melayer.cli import main; main()", "scan", "--output", args.scan],
                           env={**env, "PYTHONPATH": str(B.ROOT)}, cwd=B.ROOT, capture_output=True, check=False)
        bench(args, env)


def bench(args: argparse.Namespace, env: dict[str, str]) -> None:
    if not (Path(args.scan) / "scan.json").is_file():
        raise SystemExit(f"bench: {args.scan}/scan.json not found (run melayer scan --output {args.scan})")
    scan = str(Path(args.scan).resolve())
    checkouts = {"this checkout": str(B.ROOT)}
    if args.baseline:
        checkouts["baseline " + args.baseline] = str(Path(args.baseline).resolve())
    print(f"melayer report {getattr(args, 'label', args.scan)}; {args.threads} thread(s); one fresh process per run, checkouts alternating")
    print(f"command: {B.command_line()}\n")
    runs: dict[str, list[dict]] = {k: [] for k in checkouts}
    for i in range(args.reps):
        order = list(checkouts.items())
        for label, code_dir in (order if i % 2 == 0 else order[::-1]):
            runs[label].append(run(scan, env, code_dir))
    rows, medians = [], {}
    for label, rs in runs.items():
        m = medians[label] = B.med([r["total"] for r in rs])
        rows.append([label, f"{m:.2f}", f"{B.med([r['import'] for r in rs]):.2f}", f"{B.med([r['page'] for r in rs]):.2f}",
                     f"{B.med([r['again'] for r in rs]):.2f}",
                     "yes" if rs[0]["torch"] else "no", f"{rs[0]['bytes']:,}"])
    print(B.table(["checkout", "seconds (median process)", "import melayer.cli", "page (first)",
                   "page again, same process",
                   "torch imported", "page bytes"], rows))
    if args.baseline:
        base, this = medians["baseline " + args.baseline], medians["this checkout"]
        print(f"\nbaseline / this checkout: {base / this:.2f}x")


if __name__ == "__main__":
    main()
