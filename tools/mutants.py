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

At the end it prints the score per module (the file each mutant landed in) as a Markdown table, the one in
docs/development.md. Each mutant runs only the tests that cover its module (its files, narrowed with ``-k``), so the
whole set runs in minutes rather than hours.

Exit status: 0 if every mutant was killed, 1 otherwise. This is a habit, not a CI gate: run it when you change a
rule or its tests, and add a mutant for every rule you add (the likeliest one-line slips of a function that
computes a published number, each with a test that compares that number against an independent computation).
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
T_RULES = "tests/test_pinned_rules.py"  # pure rules against NumPy / loops / torch.median / a hand-written BH
T_MODELS = "tests/test_pinned_models.py"  # tiny planted checkpoints against plain PyTorch hooks and hand edits
T_WEMASK = "tests/test_wemask.py"
T_RUN = "tests/test_eval_run.py"
T_SCORING = "tests/test_eval_scoring.py"
STATS_K = "bootstrap or mcnemar or aggregate"

MUTANTS: tuple[Mutant, ...] = (
    # --- perplexity (explain's and eval's; checked against lm-eval's loglikelihood_rolling) ----------------
    Mutant("perplexity: each token scored from its own position's logits",
           "logp = torch.log_softmax(head(hidden[i, s - 1: e - 1, :]), dim=-1)",
           "logp = torch.log_softmax(head(hidden[i, s: e, :]), dim=-1)", ("tests/test_perplexity.py",)),
    Mutant("perplexity: NLL averaged over windows, not tokens",
           'return {"ppl": math.exp(nll / count)', 'return {"ppl": math.exp(nll / len(windows))',
           ("tests/test_perplexity.py", "tests/test_explain.py"), "ppl or perplexity"),
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
    Mutant("wemask: token='massive' compares each token with the whole call's median (padding included)",
           "cut = (a.median(dim=-1).values * self.criterion.median_ratio)",
           "cut = (a.median() * self.criterion.median_ratio)", (T_WEMASK, T_MODELS), "massive"),
    Mutant("capture: first real token is column 0",
           "return (mask != 0).to(torch.int8).argmax(dim=1).to(torch.long)",
           "return torch.zeros(mask.shape[0], dtype=torch.long, device=mask.device)", (T_RULES, T_MODELS),
           "first_real or rigidity"),
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
           "mcnemar(outcomes(m.kind, base.values(m.name)), outcomes(m.kind, res.values(m.name)))",
           "mcnemar(outcomes(m.kind, res.values(m.name)), outcomes(m.kind, base.values(m.name)))", (T_RUN,), "compare"),
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
    # --- capture: padding, positions, the streaming reduction, the tracked token -----------------------------
    Mutant("capture: position ids start at 1",
           "return (mask.long().cumsum(-1) - 1).clamp(min=0)", "return mask.long().cumsum(-1).clamp(min=0)",
           (T_RULES,), "position_ids"),
    Mutant("capture: the attention mask marks the left end of each row",
           "mask[i, width - len(row):] = 1", "mask[i, :len(row)] = 1", (T_RULES,), "first_real"),
    Mutant("reduce: the upper of the two middle values",
           "k = (arr.size - 1) // 2", "k = arr.size // 2", (T_RULES, T_MODELS), "median"),
    Mutant("reduce: the median counts the padding",
           "medians = [lower_median(a[b, off:].reshape(-1)) for b, off in enumerate(self.offsets)]",
           "medians = [lower_median(a[b].reshape(-1)) for b, off in enumerate(self.offsets)]",
           (T_MODELS,), "median"),
    Mutant("tracker: the massive token's column ignores left padding",
           "self.cols = (self.first + pos).clamp(max=t - 1)", "self.cols = pos.clamp(max=t - 1)",
           (T_MODELS,), "rigidity or decomposition"),
    Mutant("tokens: the token that sees the fewest keys is a sequence start (so is every decode step)",
           "starts = real & (count == 1)", "starts = real & (count == count.amin(dim=-1, keepdim=True))",
           (T_MODELS,), "wemask_masks"),
    # --- explain: attribution, ranking, the massive token, the downstream window ------------------------------
    Mutant("attribution: FFN contributions from the first prompt only",
           "return down_in.mean(0)[None, :] * w", "return down_in[0][None, :] * w", (T_MODELS,), "decomposition"),
    Mutant("attribution: control neurons ranked weakest first",
           "return share.max(0).values.argsort(descending=True)", "return share.max(0).values.argsort()",
           (T_MODELS,), "downstream"),
    Mutant("attribution: the attention branch read before the post-attention norm",
           'attn = rec["post_attn_out"][:, d] if has_pa else rec["attn_out"][:, d]', 'attn = rec["attn_out"][:, d]',
           (T_MODELS,), "decomposition"),
    Mutant("explain: top neurons ranked by |contribution|",
           "order = (contrib[i] * torch.sign(total[i])).argsort(descending=True)[: max(10, max_neurons)]",
           "order = contrib[i].abs().argsort(descending=True)[: max(10, max_neurons)]", (T_MODELS,), "decomposition"),
    Mutant("explain: downstream window starts after the ME layer",
           "later = arr[me_layer:].max(axis=0)", "later = arr[me_layer + 1:].max(axis=0)", (T_MODELS,), "downstream"),
    Mutant("explain: mean ratio window starts after the ME layer",
           "zip(self.downstream_profile[self.me_layer:], self.baseline_profile[self.me_layer:])",
           "zip(self.downstream_profile[self.me_layer + 1:], self.baseline_profile[self.me_layer + 1:])",
           (T_MODELS,), "downstream"),
    Mutant("explain: the tracker assumes the scan feeds prompts in input order",
           "on_batch=tracker.expect)", "on_batch=None)", (T_MODELS,), "downstream"),
    Mutant("massive token: the smallest persistent entry instead of the largest",
           "pos = max(entries)[1] if entries else None", "pos = min(entries)[1] if entries else None",
           (T_MODELS,), "decomposition"),
    Mutant("ablate: overlapping edits restored first to last",
           "for stored_weight, where, values in reversed(saved):", "for stored_weight, where, values in saved:",
           (T_MODELS,), "overlapping"),
    # --- rigidity and sinks ----------------------------------------------------------------------------------
    Mutant("rigidity: ordinary tokens exclude column 0 instead of the first real token",
           "first = int(first_real(real[None])[0])", "first = 0", (T_MODELS,), "rigidity"),
    Mutant("rigidity: pairwise similarity counts each prompt with itself",
           "iu = np.triu_indices(n, 1)", "iu = np.triu_indices(n)", (T_MODELS,), "rigidity"),
    Mutant("sinks: a score equal to epsilon is a sink (every sink rate: overall, per layer, massive token)",
           "return np.where(np.isnan(a), np.nan, a > self.epsilon)",
           "return np.where(np.isnan(a), np.nan, a >= self.epsilon)", (T_RULES,), "sink_threshold"),
    Mutant("sinks: alpha averaged over the keys a query sees, not the queries that see the key",
           "seen = vis.sum(0).clamp_min(1.0)", "seen = vis.sum(1).clamp_min(1.0)",
           ("tests/test_rigidity_sinks.py",), "eager_output_attentions"),
    # --- weights: the persistence window ---------------------------------------------------------------------
    Mutant("weights: a layer counts itself among the later layers",
           "for i in range(layer + 1, n_layers)]\n        return (not later)",
           "for i in range(layer, n_layers)]\n        return (not later)", (T_RULES,), "path_rule"),
    Mutant("weights: persistence fraction exclusive",
           "sum(later) >= crit.persist_frac * len(later))", "sum(later) > crit.persist_frac * len(later))",
           (T_RULES,), "path_rule"),
    Mutant("weights: the last layer (no later layers) never persists",
           "return (not later) or (later[0]", "return bool(later) and (later[0]", (T_RULES,), "path_rule"),
    # --- statistics, WeMask's k, compare's sinks, the sweep table, fine-tuning --------------------------------
    Mutant("stats: bootstrap never resamples the last index",
           "yield rng.integers(0, n, size=(m, n))", "yield rng.integers(0, n - 1, size=(m, n))",
           (T_RULES,), "bootstrap"),
    Mutant("wemask: k rounded instead of floored",
           "return int(float(rate) * hidden_size)", "return round(float(rate) * hidden_size)", (T_RULES,), "wemask_k"),
    Mutant("compare: sink rate measured without the mask",
           "_sinks(lm, prompts, masks.get(rate))", "_sinks(lm, prompts)", ("tests/test_pinned_compare.py",), None),
    Mutant("sweep: BH p-values handed out in sorted order",
           "for r, p in zip(tested, adjusted):", "for r, p in zip(tested, sorted(adjusted)):", (T_RULES,), "bh"),
    Mutant("sweep: significance from the unadjusted p",
           'r["significant_bh"] = bool(p <= alpha)', 'r["significant_bh"] = bool(r["mcnemar_p"] <= alpha)',
           (T_RULES,), "bh"),
    Mutant("finetune: WeMask built but never applied during training",
           "        if wm is not None:\n            applied.enter_context(wm)\n", "", ("tests/test_pinned_finetune.py",),
           None),
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


ENV = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "MKL_NUM_THREADS": os.environ.get("MKL_NUM_THREADS", "1"),
       "HF_HUB_OFFLINE": "1", "MELAYER_QUIET": "1"}
# third-party modules every test run needs: imported once by the parent when runs are forked (``--fork``), so that
# each mutant's run starts from them instead of importing torch and transformers afresh (the bulk of a short run)
PRELOAD = ("numpy", "scipy.stats", "torch", "transformers", "tokenizers", "safetensors.torch", "hypothesis",
           "transformers.models.llama.modeling_llama", "transformers.models.gemma3.modeling_gemma3",
           "transformers.models.gpt2.modeling_gpt2", "transformers.generation.utils", "_pytest.python")


def preload() -> None:
    """Import :data:`PRELOAD` (never ``melayer``: each forked run imports the mutated copy)."""
    import importlib

    os.environ.update(ENV)
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass


def _summary(rc: int, output: str, secs: float) -> tuple[int, float, str]:
    lines = output.strip().splitlines()
    failed = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    return rc, secs, (failed or lines[-1:] or [""])[0]


def _run_forked(root: Path, args: list[str], timeout: float) -> tuple[int, str]:
    """pytest ``args`` in a forked child of this process (which has :func:`preload`-ed), with ``root`` first on the
    path; (exit code, output). A child past ``timeout`` is killed (exit code -1)."""
    import signal

    with tempfile.TemporaryFile(mode="w+") as out:
        pid = os.fork()
        if pid == 0:  # the child: never returns
            code = 3
            try:
                os.chdir(root)
                os.dup2(out.fileno(), 1)
                os.dup2(out.fileno(), 2)
                sys.path.insert(0, str(root))
                os.environ["PYTHONPATH"] = str(root)  # for the test's own subprocesses (the CLI)
                import pytest

                code = int(pytest.main(args))
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)
        deadline = time.monotonic() + timeout
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return -1, "timeout"
            time.sleep(0.1)
        out.seek(0)
        return os.waitstatus_to_exitcode(status), out.read()


def run_tests(root: Path, m: Mutant, timeout: float, whole_files: bool, fork: bool) -> tuple[int, float, str]:
    """(pytest's exit code, seconds, last line of its output)."""
    cmd = pytest_cmd(m, whole_files)
    t0 = time.perf_counter()
    if fork:
        rc, output = _run_forked(root, cmd[3:], timeout)  # drop "python -m pytest"
        return _summary(rc, output, time.perf_counter() - t0)
    env = {**os.environ, "PYTHONPATH": str(root), **ENV}
    try:
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, time.perf_counter() - t0, "timeout"
    return _summary(proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-k", dest="select", action="append",
                    help="only mutants whose name contains this text (case-insensitive; repeat for several)")
    ap.add_argument("--list", action="store_true", help="list the mutants and where they apply; run nothing")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per test run (default 900)")
    ap.add_argument("--no-fork", dest="fork", action="store_false", default=hasattr(os, "fork"),
                    help="start every test run as a fresh interpreter instead of forking one that has imported "
                         "torch and transformers once (slower; the default where os.fork is missing)")
    ap.add_argument("--whole-files", action="store_true",
                    help="run each mutant's whole test files, ignoring its -k selection (slower, for scoring)")
    ap.add_argument("--repo", type=Path, default=REPO,
                    help="the checkout whose melayer/ and tests/ are copied (default: this one), e.g. an older one")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.select or any(k.lower() in m.name.lower() for k in args.select)]
    if not chosen:
        print(f"no mutant matches {args.select!r}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    if args.fork and not args.list:
        preload()
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
                rc, secs, tail = run_tests(root, m, args.timeout, args.whole_files, args.fork)
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
                rc, secs, tail = run_tests(root, m, args.timeout, args.whole_files, args.fork)
            finally:
                path.write_text(text)
            status = "SURVIVED" if rc == 0 else "killed"
            results.append((m, status, where, secs, tail))
            print(f"{status:10s} {m.name}  [{where}, {secs:.0f} s]  {tail}", flush=True)
    if args.list:
        return 0
    killed = sum(1 for r in results if r[1] == "killed")
    print(f"\n{killed}/{len(results)} mutants killed in {time.perf_counter() - started:.0f} s\n")
    print(score_table([(where, status) for _, status, where, _, _ in results]))
    for m, status, where, _, tail in results:
        if status != "killed":
            print(f"  {status}: {m.name} [{where}] {tail}")
    return 0 if killed == len(results) else 1


def score_table(rows: list[tuple[str, str]]) -> str:
    """A Markdown table of the score per module from (module file, status) pairs (``-`` = the original text was not
    found: counted under "unlocated")."""
    per: dict[str, list[str]] = {}
    for where, status in rows:
        per.setdefault(where if where != "-" else "unlocated", []).append(status)
    lines = ["| module | mutants | killed | score |", "|---|---:|---:|---:|"]
    for module in sorted(per):
        statuses = per[module]
        k = statuses.count("killed")
        lines.append(f"| `{module}` | {len(statuses)} | {k} | {k / len(statuses):.0%} |")
    total = sum(len(v) for v in per.values())
    k = sum(v.count("killed") for v in per.values())
    lines.append(f"| **all** | {total} | {k} | {k / total:.0%} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
