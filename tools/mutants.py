"""Plant one-line bugs (mutants) in a temporary copy of melayer and check that the tests catch each one.

Usage (from the repository root, with the project's Python)::

    OMP_NUM_THREADS=1 python tools/mutants.py              # every mutant below
    OMP_NUM_THREADS=1 python tools/mutants.py -k wemask    # only mutants whose name contains "wemask" (repeatable)
    python tools/mutants.py --list                         # show the mutants, run nothing

Each mutant is (name, original text, mutated text, tests). The original text must occur exactly once in the
whole ``melayer`` package: the file is found by searching for it, so a mutant keeps working when code moves
between files (only a changed line needs its entry edited). For every mutant the script

1. copies ``melayer/``, ``tests/`` and ``pyproject.toml`` into a fresh temporary directory (``tempfile``: no fixed
   names, so several runs may go at once), once per run;
2. runs the mutant's test selection on the unmutated copy first (it must pass: a red baseline proves nothing);
3. replaces the original text by the mutant, checks that the file still compiles, runs the same selection with
   ``PYTHONPATH`` pointing at the copy, restores the file;
4. reports ``killed`` (the tests failed), ``SURVIVED`` (they passed), ``not found`` / ``ambiguous`` (the original
   text is not in the package exactly once: the entry needs updating) or ``invalid`` (the mutant does not compile).

Exit status: 0 if every mutant was killed, 1 otherwise. This is a habit, not a CI gate: run it when you change a
rule or its tests, and add a mutant for every rule you add.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    original: str
    mutant: str
    tests: tuple[str, ...]  # pytest node ids or files, relative to the repository root
    k: str | None = None  # optional pytest -k expression


T_SCAN = "tests/test_scan.py"
T_WEMASK = "tests/test_wemask.py"
T_RUN = "tests/test_eval_run.py"
T_SCORING = "tests/test_eval_scoring.py"
STATS_K = "bootstrap or mcnemar or aggregate"

MUTANTS: tuple[Mutant, ...] = (
    # --- the criterion and the ME-layer rule -------------------------------------------------------------
    Mutant("criterion: cutoff ignores the median ratio",
           "return max(self.abs_min, self.median_ratio * float(median))", "return self.abs_min",
           (T_SCAN,), "criterion or me_layer"),
    Mutant("criterion: persistence uses the emergence ratio",
           "abs(value) > self.persist_ratio * median", "abs(value) > self.median_ratio * median",
           (T_SCAN,), "me_layer or criterion"),
    Mutant("me layer: 'persists in the next layer' dropped",
           "if later[0] and sum(later) / len(later) >= crit.persist_frac:",
           "if sum(later) / len(later) >= crit.persist_frac:", (T_SCAN,), "me_layer"),
    Mutant("me layer: persistence fraction exclusive",
           "if later[0] and sum(later) / len(later) >= crit.persist_frac:",
           "if later[0] and sum(later) / len(later) > crit.persist_frac:", (T_SCAN,), "me_layer"),
    Mutant("me layer: the last ME layer instead of the first",
           "me_layer = layer if me_layer is None else me_layer", "me_layer = layer",
           (T_SCAN,), "me_layer"),
    Mutant("consensus: tie-break toward a real layer removed",
           "if me_layer is None and ties:", "if False:", (T_SCAN,), "consensus"),
    Mutant("consensus: short prompts vote",
           "eligible=len(ids) >= crit.min_tokens", "eligible=True", (T_SCAN,), "short"),
    # --- WeMask selection ------------------------------------------------------------------------------------
    Mutant("wemask: top-k dims averaged over the batch (the released code's bug)",
           "idx = sel.abs().topk(self.k, dim=-1).indices",
           "idx = sel.abs().mean(0, keepdim=True).topk(self.k, dim=-1).indices.expand(sel.shape[0], -1)",
           (T_WEMASK,), "per_row or no_bos"),
    Mutant("wemask: token='massive' median counts padding",
           "cut = crit.cutoff(a[b][real].median())", "cut = crit.cutoff(a[b].median())",
           (T_WEMASK,), "massive"),
    Mutant("capture: first real token is column 0",
           "return (mask != 0).to(torch.int8).argmax(dim=1).to(torch.long)",
           "return torch.zeros(mask.shape[0], dtype=torch.long, device=mask.device)", (T_WEMASK,),
           "first_real or per_row"),
    Mutant("wemask: gamma ignored",
           "keep = 1.0 - self.gamma", "keep = 0.0", (T_WEMASK,), "gamma"),
    Mutant("wemask: select=weight uses the smallest gains",
           "return gain.abs().topk(k).indices.sort().values.to(self.lm.device)",
           "return gain.abs().topk(k, largest=False).indices.sort().values.to(self.lm.device)",
           (T_WEMASK,), "select_weight"),
    # --- statistics ------------------------------------------------------------------------------------------
    Mutant("stats: a 90 % interval labelled 95 %",
           "lo, hi = np.nanpercentile(stats, [100 * (1 - level) / 2, 100 * (1 + level) / 2])",
           "lo, hi = np.nanpercentile(stats, [5, 95])", (T_SCORING,), STATS_K),
    Mutant("stats: paired interval at 90 %",
           "lo, hi = np.nanpercentile(np.concatenate(chunks), [100 * (1 - level) / 2, 100 * (1 + level) / 2])",
           "lo, hi = np.nanpercentile(np.concatenate(chunks), [5, 95])", (T_SCORING,), STATS_K),
    Mutant("stats: unpaired resampling in the paired bootstrap",
           "chunks.append(_agg_indexed(kind, b, idx) - _agg_indexed(kind, a, idx))",
           "chunks.append(_agg_indexed(kind, b, idx) - _agg_indexed(kind, a, idx[::-1]))", (T_SCORING,), STATS_K),
    Mutant("stats: McNemar one-sided",
           'binomtest(gained, n, 0.5, alternative="two-sided")', 'binomtest(gained, n, 0.5, alternative="greater")',
           (T_SCORING,), STATS_K),
    Mutant("stats: exp_ratio without exp",
           'return np.exp(ratio) if kind == "exp_ratio" else ratio', "return ratio", (T_SCORING,), STATS_K),
    # --- compare ---------------------------------------------------------------------------------------------
    Mutant("compare: bootstrap difference sign flipped",
           'entry["vs_baseline"] = paired_bootstrap(m.kind, base.values(m.name), res.values(m.name),',
           'entry["vs_baseline"] = paired_bootstrap(m.kind, res.values(m.name), base.values(m.name),',
           (T_RUN,), "compare"),
    Mutant("compare: McNemar arguments swapped",
           'entry["mcnemar"] = mcnemar(base.values(m.name), res.values(m.name))',
           'entry["mcnemar"] = mcnemar(res.values(m.name), base.values(m.name))', (T_RUN,), "compare"),
    # --- resume ----------------------------------------------------------------------------------------------
    Mutant("resume: every stored record returned, not the requested ones",
           "records = [done[i] for i in ids]", "records = list(done.values())", (T_RUN,), "resume"),
    Mutant("resume: a duplicate line wins over the first",
           'done.setdefault(rec["id"], rec)', 'done[rec["id"]] = rec', (T_RUN,), "resume"),
    # --- answers ---------------------------------------------------------------------------------------------
    Mutant("gsm8k: strict takes the last '####'",
           "m = pattern.search(output)", "m = ([*pattern.finditer(output)] or [None])[-1]", (T_SCORING,), "gsm8k"),
    Mutant("gsm8k: flexible takes the first number",
           "return normalize_number(nums[-1]) if nums else None", "return normalize_number(nums[0]) if nums else None",
           (T_SCORING,), "gsm8k"),
    Mutant("layers: a range A-B excludes B",
           "items.extend(range(lo, hi + 1))", "items.extend(range(lo, hi))", (T_WEMASK,), "parse_layers"),
    # --- sweeps and split models --------------------------------------------------------------------------
    Mutant("sweep: McNemar p-values left unadjusted",
           'adjusted = false_discovery_control([r["mcnemar_p"] for r in tested], method="bh")',
           'adjusted = [r["mcnemar_p"] for r in tested]', ("tests/test_sweep.py",), "benjamini"),
    Mutant("sweep: a cell counts as finished whatever its settings",
           'same = done.get("settings") == cell["settings"] and done.get("fingerprint") == cell["fingerprint"]',
           "same = True", ("tests/test_sweep.py",), "finished_only"),
    Mutant("devices: an edit of an offloaded norm is dropped",
           'overlays.enter_context(edited_offloaded_param(norm, "weight", weight))', "pass",
           ("tests/test_offload.py",), "norm_edits"),
)


def locate(pkg: Path, original: str) -> tuple[Path | None, int]:
    """The one file of ``pkg`` holding ``original`` and how many times it occurs across the package."""
    hits = [(p, p.read_text().count(original)) for p in sorted(pkg.rglob("*.py"))]
    hits = [(p, n) for p, n in hits if n]
    total = sum(n for _, n in hits)
    return (hits[0][0] if len(hits) == 1 else None), total


def pytest_cmd(m: Mutant, whole_files: bool) -> list[str]:
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-rfE", "-p", "no:cacheprovider", "-m", "not slow", *m.tests]
    return cmd + (["-k", m.k] if m.k and not whole_files else [])


def run_tests(root: Path, m: Mutant, timeout: float, whole_files: bool) -> tuple[int, float, str]:
    """(pytest's exit code, seconds, last line of its output)."""
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "MKL_NUM_THREADS": os.environ.get("MKL_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1", "MELAYER_QUIET": "1"}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(pytest_cmd(m, whole_files), cwd=root, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, time.perf_counter() - t0, "timeout"
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    failed = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    return proc.returncode, time.perf_counter() - t0, (failed or lines[-1:] or [""])[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-k", dest="select", action="append",
                    help="only mutants whose name contains this text (case-insensitive; repeat for several)")
    ap.add_argument("--list", action="store_true", help="list the mutants and where they apply; run nothing")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per test run (default 900)")
    ap.add_argument("--whole-files", action="store_true",
                    help="run each mutant's whole test files, ignoring its -k selection (slower, for scoring)")
    ap.add_argument("--repo", type=Path, default=REPO,
                    help="the checkout whose melayer/ and tests/ are copied (default: this one), e.g. an older one")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.select or any(k.lower() in m.name.lower() for k in args.select)]
    if not chosen:
        print(f"no mutant matches {args.select!r}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="melayer-mutants-") as tmp:
        root = Path(tmp)
        for name in ("melayer", "tests"):
            shutil.copytree(args.repo / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(args.repo / "pyproject.toml", root / "pyproject.toml")
        for path in (root, *root.rglob("*")):  # like a normal checkout: NLTK refuses group-writable data dirs
            path.chmod(path.stat().st_mode & ~0o022)
        pkg = root / "melayer"
        baselines: dict[tuple, int] = {}
        results = []
        for m in chosen:
            path, count = locate(pkg, m.original)
            where = str(path.relative_to(root)) if path else "-"
            if count == 0 or path is None or count > 1:
                status = "not found" if count == 0 else "ambiguous"
                results.append((m, status, where, 0.0, f"original text occurs {count} times in melayer/"))
                print(f"{status:10s} {m.name}  [{where}]", flush=True)
                continue
            if args.list:
                print(f"{'':10s} {m.name}  [{where}]  tests: {' '.join(m.tests)}{' -k ' + m.k if m.k else ''}")
                continue
            key = (m.tests, None if args.whole_files else m.k)
            if key not in baselines:
                rc, secs, tail = run_tests(root, m, args.timeout, args.whole_files)
                baselines[key] = rc
                if rc not in (0, 5):
                    print(f"baseline FAILS for {' '.join(m.tests)} -k {m.k}: {tail}", flush=True)
            if baselines[key] == 5:  # pytest: no test selected -> nothing can catch the mutant
                results.append((m, "no tests", where, 0.0, "no test selected"))
                print(f"{'no tests':10s} {m.name}", flush=True)
                continue
            if baselines[key] != 0:
                results.append((m, "no baseline", where, 0.0, "the selection fails without the mutant"))
                print(f"{'no base':10s} {m.name}", flush=True)
                continue
            text = path.read_text()
            mutated = text.replace(m.original, m.mutant)
            try:
                compile(mutated, str(path), "exec")
            except SyntaxError as exc:
                results.append((m, "invalid", where, 0.0, str(exc)))
                print(f"{'invalid':10s} {m.name}: {exc}", flush=True)
                continue
            path.write_text(mutated)
            try:
                rc, secs, tail = run_tests(root, m, args.timeout, args.whole_files)
            finally:
                path.write_text(text)
            status = "SURVIVED" if rc == 0 else "killed"
            results.append((m, status, where, secs, tail))
            print(f"{status:10s} {m.name}  [{where}, {secs:.0f} s]  {tail}", flush=True)
    if args.list:
        return 0
    killed = sum(1 for r in results if r[1] == "killed")
    print(f"\n{killed}/{len(results)} mutants killed")
    for m, status, where, _, tail in results:
        if status != "killed":
            print(f"  {status}: {m.name} [{where}] {tail}")
    return 0 if killed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
