"""A sweep spec (YAML) and its expansion into independent cells.

A spec names models and a list of run blocks; each block is one command (``eval``, ``compare``, ``finetune``, or
any registered analysis of a loaded model: ``scan``, ``explain``, ``rigidity``, ``sinks``, see
:func:`melayer.reporting.results.analyses`) with lists along its axes (tasks, rates, select rules, seeds). Expanding takes the product of the
axes that apply to the command; every cell is one existing resumable run. Example (``examples/sweep.yaml``)::

    models: [smollm2-135m]
    runs:
      - command: compare
        tasks: [arc_easy]
        rates: [0.005, 0.01, 0.05]
        select: [activation, weight]
        limit: 50
      - command: compare              # any registered intervention (melayer ls methods), with its parameters
        tasks: [arc_easy]
        method: [act, "zerotuning:gamma=2", "wemask_before:rate=0.01"]
        limit: 50

Cells are keyed by a content hash of their settings and of the model's fingerprint, so a cell's output
directory is the same on every run of the same spec: finished cells are skipped, partial ones resume.
Some cells depend on others, computed once and shared: a ``compare`` cell at rate r pairs the rate-0 baseline
(an ``eval`` cell) with rate r (or with ``method`` m, one cell per method: an intervention from
:mod:`melayer.interventions.methods` written as on the command line, calibrated on task items outside the
evaluated ones), and the ME layer comes from a ``scan`` cell of the same model unless the block
gives ``me_layer`` or ``layers``. Cells therefore run in two stages: scans and baselines first, the rest after.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any

from melayer.finetuning.config import METHODS
from melayer.reporting.results import analyses
from melayer.util.errors import MelayerError

SCHEMA = "melayer.sweep/1"
STUDIES = ("eval", "compare", "finetune")  # commands with axes of their own; every analysis is a command too
COMMANDS = (*analyses(), *STUDIES)
TOP_KEYS = {"models", "dtype", "arch", "output", "runs", "name", "device_map", "max_memory"}
# per command: the keys a block may hold (axes are lists; the rest are scalars passed to the run)
_COMMON = {"command", "models", "dtype", "arch", "device_map", "max_memory"}
BLOCK_KEYS = {
    **{name: _COMMON | {"prompts", "batch_size", "options"} for name in analyses()},
    "eval": _COMMON | {"tasks", "rates", "select", "limit", "batch_size", "max_new_tokens", "chat", "gamma",
                       "layers", "me_layer", "task_options", "method"},
    "compare": _COMMON | {"tasks", "rates", "select", "seeds", "limit", "batch_size", "max_new_tokens", "chat",
                          "gamma", "layers", "me_layer", "task_options", "n_boot", "sinks", "method"},
    "finetune": _COMMON | {"method", "data", "rates", "select", "seeds", "gamma", "layers", "me_layer", "options"},
}
# settings that may grow without a new cell directory (the run resumes and extends): not part of the key
EXTENDABLE = ("limit", "batch_size")


@dataclass
class Cell:
    """One independent run of the grid."""

    command: str  # scan | eval | compare | finetune
    model: str  # the melayer.load spec
    fingerprint: dict[str, Any]
    settings: dict[str, Any]  # everything the run takes besides the model
    needs: dict[str, str] = field(default_factory=dict)  # role -> cell id ("scan", "baseline")
    stage: int = 1

    @property
    def key(self) -> str:
        """Content hash of what determines the result (extendable settings excluded)."""
        ident = {"command": self.command, "fingerprint": self.fingerprint,
                 "settings": {k: v for k, v in self.settings.items() if k not in EXTENDABLE}}
        return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:12]

    @property
    def id(self) -> str:
        s = self.settings
        parts = [self.command, _slug(self.model)]
        if s.get("task"):
            parts.append(_slug(s["task"]))  # a directory name: never a path, whatever the spec says
        if s.get("method"):
            parts.append(_slug(s["method"]))
        if "rate" in s:
            parts.append(f"r{s['rate']:g}")
            if s["rate"] > 0 and s.get("select"):
                parts.append(s["select"])
        if "seed" in s:
            parts.append(f"s{s['seed']}")
        return "_".join(parts + [self.key])

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "key": self.key, "command": self.command, "model": self.model,
                "fingerprint": self.fingerprint, "settings": self.settings, "needs": self.needs, "stage": self.stage}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Cell:
        return cls(command=d["command"], model=d["model"], fingerprint=d["fingerprint"], settings=d["settings"],
                   needs=dict(d.get("needs") or {}), stage=int(d.get("stage", 1)))


def _slug(text: str) -> str:
    name = Path(text.rstrip("/")).name or text
    return re.sub(r"[^A-Za-z0-9.-]+", "-", name).strip("-")[:40] or "model"


def _as_list(value: Any, what: str) -> list[Any]:
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    if not items:
        raise MelayerError(f"sweep spec: {what} is an empty list")
    return items


def _rates(values: list[Any], where: str) -> list[float]:
    out = []
    for v in values:
        try:
            r = float(v)
        except (TypeError, ValueError):
            raise MelayerError(f"sweep spec, {where}: rate {v!r} is not a number") from None
        if not 0.0 <= r <= 1.0:
            raise MelayerError(f"sweep spec, {where}: rate {r:g} is out of range [0, 1]")
        out.append(r)
    return sorted(set(out))


def read_spec(path: str | Path) -> dict[str, Any]:
    """Parse a YAML (or JSON) spec file; one-line errors for a missing file or bad YAML."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise MelayerError(f"no such sweep spec: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise MelayerError(f"{p} is not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise MelayerError(f"{p}: a sweep spec is a mapping with 'models' and 'runs'")
    _check_size(data, p)
    return data


MAX_SPEC_VALUES = 100_000  # a real spec has tens of values; YAML aliases can make a 1 KB file expand to billions


def _check_size(data: Any, where: Path) -> None:
    """Count the values the spec expands to (aliases counted at every use), stopping at the limit: an alias bomb
    is one error line, never a run into memory exhaustion."""
    stack, seen = [data], 0
    while stack:
        obj = stack.pop()
        seen += 1
        if seen > MAX_SPEC_VALUES:
            raise MelayerError(f"{where}: the spec expands to more than {MAX_SPEC_VALUES:,} values (YAML aliases "
                               "repeating one another?); write it out plainly")
        if isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, list):
            stack.extend(obj)


def _whole(block: dict[str, Any], key: str, default: int, where: str) -> int:
    """A positive whole-number setting (``batch_size``, ``n_boot`` ...): NaN, inf, floats and strings refused."""
    value = block.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise MelayerError(f"sweep spec, {where}: {key} must be a positive integer (got {value!r})")
    return value


def _interventions(block: dict[str, Any], where: str) -> list[str]:
    """The block's ``method`` list (eval, compare) as validated method labels."""
    from melayer.interventions.methods import parse_method

    out = []
    for m in _as_list(block.get("method"), f"{where}: method"):
        if not isinstance(m, str):
            raise MelayerError(f"sweep spec, {where}: method {m!r} is not a method spec such as act or "
                               "wemask_before:rate=0.01")
        try:
            out.append(parse_method(m).label)
        except MelayerError as exc:
            raise MelayerError(f"sweep spec, {where}: {exc}") from None
    if len(set(out)) != len(out):
        raise MelayerError(f"sweep spec, {where}: the same method is given twice")
    return out


def expand(spec: dict[str, Any], fingerprint=None) -> list[Cell]:
    """All cells of ``spec`` (a parsed spec), shared prerequisites (scans, baselines) included once, stage 1
    before stage 2. ``fingerprint(model, block)`` gives a model's identity (default:
    :func:`melayer.sweeps.fingerprint.model_fingerprint`)."""
    from melayer.eval.tasks import TASKS
    from melayer.interventions.wemask import SELECT_RULES

    if fingerprint is None:
        from melayer.sweeps.fingerprint import model_fingerprint as fingerprint
    unknown = set(spec) - TOP_KEYS
    if unknown:
        raise MelayerError(f"sweep spec: unknown key {min(unknown)!r}; top-level keys are {', '.join(sorted(TOP_KEYS))}")
    runs = spec.get("runs")
    if not isinstance(runs, list) or not runs:
        raise MelayerError("sweep spec: 'runs' must be a non-empty list of blocks, each with a 'command'")
    prints: dict[str, dict[str, Any]] = {}
    cells: dict[str, Cell] = {}

    def add(cell: Cell) -> Cell:
        return cells.setdefault(cell.id, cell)

    for n, block in enumerate(runs, 1):
        where = f"runs[{n}]"
        if not isinstance(block, dict) or block.get("command") not in COMMANDS:
            raise MelayerError(f"sweep spec, {where}: 'command' must be one of {', '.join(COMMANDS)}")
        cmd = block["command"]
        bad = set(block) - BLOCK_KEYS[cmd]
        if bad:
            raise MelayerError(f"sweep spec, {where} ({cmd}): unknown key {min(bad)!r}; "
                               f"{cmd} takes {', '.join(sorted(BLOCK_KEYS[cmd] - {'command'}))}")
        models = _as_list(block.get("models", spec.get("models")), f"{where}: models")
        if not models:
            raise MelayerError(f"sweep spec, {where}: no models (give 'models' at the top or in the block)")
        load = {"dtype": str(block.get("dtype", spec.get("dtype", "float32"))),
                "arch": block.get("arch", spec.get("arch"))}
        for k in ("device_map", "max_memory"):
            v = block.get(k, spec.get(k))
            if v is not None:
                load[k] = v
        tasks = [str(t) for t in _as_list(block.get("tasks"), f"{where}: tasks")]
        for t in tasks:
            if t not in TASKS:
                raise MelayerError(f"sweep spec, {where}: unknown task {t!r}; choose from {', '.join(TASKS)}")
        if cmd in ("eval", "compare") and not tasks:
            raise MelayerError(f"sweep spec, {where} ({cmd}): give 'tasks'")
        rates = _rates(_as_list(block.get("rates"), f"{where}: rates"), where)
        selects = [str(s) for s in _as_list(block.get("select"), f"{where}: select")] or ["activation"]
        for s in selects:
            if s not in SELECT_RULES:
                raise MelayerError(f"sweep spec, {where}: unknown select rule {s!r}; use {', '.join(SELECT_RULES)}")
        seeds = _as_list(block.get("seeds"), f"{where}: seeds") or [0]
        if any(not isinstance(s, int) or isinstance(s, bool) for s in seeds):
            raise MelayerError(f"sweep spec, {where}: seeds must be integers")
        limit = block.get("limit")
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise MelayerError(f"sweep spec, {where}: limit must be a positive integer (got {limit!r})")
        gamma = float(block.get("gamma", 1.0))
        mask = {"gamma": gamma, "layers": block.get("layers"), "me_layer": block.get("me_layer")}
        if cmd in ("compare", "eval", "finetune") and not 0.0 <= gamma <= 1.0:
            raise MelayerError(f"sweep spec, {where}: gamma must be in [0, 1]")
        run_opts = {k: block[k] for k in ("batch_size", "max_new_tokens", "chat") if k in block}
        run_opts["batch_size"] = _whole(block, "batch_size", 8, where)
        if "max_new_tokens" in block:
            run_opts["max_new_tokens"] = _whole(block, "max_new_tokens", 1, where)
        n_boot = _whole(block, "n_boot", 2000, where)
        method = block.get("method", "sft")
        if cmd == "finetune" and method not in METHODS:
            raise MelayerError(f"sweep spec, {where}: unknown finetune method {method!r}; use {', '.join(METHODS)}")
        interventions = _interventions(block, where) if cmd in ("eval", "compare") else []
        task_options = dict(block.get("task_options") or {})

        for model in models:
            model = str(model)
            if model not in prints:
                prints[model] = fingerprint(model)
            fp = prints[model]

            scan = Cell("scan", model, fp, {**load, "prompts": None, "batch_size": 8})  # added when needed
            needs_scan = mask["me_layer"] is None and mask["layers"] is None

            if cmd in analyses():  # one cell per model; the analysis finds its own ME layer
                settings = {**load, "prompts": block.get("prompts"), "batch_size": run_opts["batch_size"]}
                if block.get("options"):
                    settings["options"] = analyses()[cmd].check_options(block["options"], f"sweep spec, {where}")
                add(Cell(cmd, model, fp, settings))
                continue
            if cmd == "finetune":
                for rate, sel, seed in product(rates or [0.0], selects, seeds):  # finds its own ME layer
                    add(Cell("finetune", model, fp, {**load, "method": method, "data": block.get("data"),
                                                      "rate": rate, "select": sel if rate > 0 else None,
                                                      "seed": seed, **mask, "options": dict(block.get("options") or {})},
                             stage=2))
                continue
            for task in tasks:
                common = {**load, "task": task, "limit": limit, **run_opts, "task_options": task_options}
                baseline = Cell("eval", model, fp, {**common, "rate": 0.0, "select": None})
                for label in interventions:  # one cell per method, against the shared baseline
                    needs = {"scan": add(scan).id} if needs_scan else {}
                    extra: dict[str, Any] = {"method": label, "me_layer": mask["me_layer"]}
                    if cmd == "eval":
                        add(Cell("eval", model, fp, {**common, **extra}, needs=needs, stage=2))
                        continue
                    needs["baseline"] = add(baseline).id
                    for seed in seeds:
                        add(Cell("compare", model, fp, {**common, **extra, "seed": seed, "n_boot": n_boot,
                                                         "sinks": bool(block.get("sinks", True))},
                                 needs=needs, stage=2))
                if cmd == "eval":
                    if interventions and not rates:
                        continue
                    for rate, sel in product(rates or [0.0], selects):
                        if rate == 0:
                            add(baseline)
                            continue
                        needs = {"scan": add(scan).id} if needs_scan else {}
                        add(Cell("eval", model, fp, {**common, "rate": rate, "select": sel, **mask},
                                 needs=needs, stage=2))
                    continue
                # compare: every positive rate against the shared baseline
                positive = [r for r in rates if r > 0]
                if not positive and not interventions:
                    raise MelayerError(f"sweep spec, {where} (compare): give at least one rate > 0 or a method")
                base_id = add(baseline).id
                for rate, sel, seed in product(positive, selects, seeds):
                    needs = {"baseline": base_id}
                    if needs_scan:
                        needs["scan"] = add(scan).id
                    add(Cell("compare", model, fp, {**common, "rate": rate, "select": sel, "seed": seed, **mask,
                                                     "n_boot": n_boot,
                                                     "sinks": bool(block.get("sinks", True))},
                             needs=needs, stage=2))
    return sorted(cells.values(), key=lambda c: (c.stage, c.id))
