"""Peak memory of melayer.scan vs the bare decoder forward, each in its own process.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_memory.py [--tokens 4096] [--counts 1,8,32] [--threads 1]

Every measurement runs in a fresh child process (this script with ``--child``); the parent reads the child's
peak RSS from ``os.wait4`` (``ru_maxrss``). The child also reports its RSS after loading the model and the peak
of the measured call alone (Linux: ``/proc/self/clear_refs`` resets the high-water mark after loading, so
``VmHWM - VmRSS_before`` is what the forward/scan added on top of the loaded model).

1. one prompt of ``--tokens`` tokens (running WikiText-2 text): bare forward vs ``melayer.scan``
   (target: scan's peak within 10 % of the bare forward's);
2. the bare forward and ``melayer.scan`` of ``--counts`` WikiText-2 paragraphs of 300+ tokens: peak vs number of
   prompts (target: scan flat, i.e. no more growth than the bare forward's).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import benchlib as B

THREADS = B.pin_threads()


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return -1


def child(mode: str, tokens: int, count: int, model: str) -> None:
    import melayer

    lm = melayer.load(model, progress=False)
    if count:
        prompts = B.wiki_paragraphs(lm.tokenizer, count)
    else:
        prompts = B.wiki_long(lm.tokenizer, [tokens])
    n_tok = sum(B.n_tokens(lm.tokenizer, prompts))
    rows = B.encode_rows(lm, prompts) if mode == "bare" else None
    import gc

    gc.collect()
    before = _status_kb("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset VmHWM to the current RSS
        reset = True
    except OSError:
        reset = False
    if mode == "bare":
        B.bare_forward(lm, rows)
    else:
        melayer.scan(lm, prompts, progress=False)
    peak = _status_kb("VmHWM")
    print(json.dumps({"before_kb": before, "peak_kb": peak, "reset": reset, "prompts": len(prompts),
                      "tokens": n_tok}))


def run_child_wait4(mode: str, tokens: int, count: int, model: str, threads: int) -> dict:
    """Run the child and read its own peak RSS with os.wait4 (ru_maxrss, KiB on Linux)."""
    cmd = [sys.executable, __file__, "--child", mode, "--tokens", str(tokens), "--count", str(count),
           "--model", model, "--threads", str(threads)]
    env = {**os.environ, "MELAYER_QUIET": "1"}
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: exec the measurement with stdout on the pipe
        os.close(r)
        os.dup2(w, 1)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.execve(sys.executable, cmd, env)
    os.close(w)
    chunks = []
    while True:
        data = os.read(r, 65536)
        if not data:
            break
        chunks.append(data)
    os.close(r)
    _, status, usage = os.wait4(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"child failed: {' '.join(cmd)}")
    res = json.loads(b"".join(chunks).decode().strip().splitlines()[-1])
    res["maxrss_kb"] = usage.ru_maxrss
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--counts", default="1,8,32")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--child", choices=["bare", "scan"])
    ap.add_argument("--count", type=int, default=0)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.tokens, args.count, args.model)
        return

    mib = 1024.0
    print(f"model {args.model}; torch threads {THREADS}; one child process per row")
    print(f"command: {B.command_line()}\n")
    rows, res = [], {}
    for mode in ("bare", "scan"):
        B.say(f"{mode}: one prompt of {args.tokens} tokens")
        res[mode] = r = run_child_wait4(mode, args.tokens, 0, args.model, args.threads)
        rows.append([f"{'bare forward' if mode == 'bare' else 'melayer.scan'}, 1 prompt of {r['tokens']} tokens",
                     f"{r['maxrss_kb'] / mib:.0f}", f"{r['before_kb'] / mib:.0f}",
                     f"{(r['peak_kb'] - r['before_kb']) / mib:.0f}" if r["reset"] else "n/a"])
    print(B.table(["run", "peak RSS (MiB, wait4)", "RSS after load (MiB)", "added by the call (MiB)"], rows))
    b, s = res["bare"], res["scan"]
    print(f"\nscan / bare peak RSS: {s['maxrss_kb'] / b['maxrss_kb']:.3f} (target <= 1.10: "
          f"{'PASS' if s['maxrss_kb'] <= 1.10 * b['maxrss_kb'] else 'FAIL'})"
          + (f"; added by the call: scan {(s['peak_kb'] - s['before_kb']) / mib:.0f} MiB vs bare "
             f"{(b['peak_kb'] - b['before_kb']) / mib:.0f} MiB" if s["reset"] and b["reset"] else ""))

    rows = []
    for count in [int(c) for c in args.counts.split(",")]:
        got = {}
        for mode in ("bare", "scan"):
            B.say(f"{mode}: {count} WikiText-2 paragraphs")
            got[mode] = run_child_wait4(mode, 0, count, args.model, args.threads)
        b, s = got["bare"], got["scan"]
        rows.append([s["prompts"], s["tokens"], f"{b['maxrss_kb'] / mib:.0f}", f"{s['maxrss_kb'] / mib:.0f}",
                     f"{s['maxrss_kb'] / b['maxrss_kb']:.3f}",
                     f"{(b['peak_kb'] - b['before_kb']) / mib:.0f} / {(s['peak_kb'] - s['before_kb']) / mib:.0f}"
                     if s["reset"] and b["reset"] else "n/a"])
    print()
    print(B.table(["prompts (WikiText-2 paragraphs, 300+ tokens)", "tokens", "bare peak RSS (MiB)",
                   "scan peak RSS (MiB)", "scan / bare", "added by the call, bare / scan (MiB)"], rows))


if __name__ == "__main__":
    main()
