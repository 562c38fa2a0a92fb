"""Run one sweep cell in a worker process (local pool, a Slurm job, a Ray task): the public API only.

A cell's directory is ``ROOT/cells/<cell id>/``; the run writes its own results there (an analysis's
``<kind>.json``, e.g. ``scan.json``, ``eval.json`` + ``samples.jsonl``, ``compare.json`` + ``rate_*/``) and, last, ``cell.json`` (atomically), which
marks the cell finished. A killed cell has no ``cell.json``: the next run redoes it, and the eval runs inside
resume from their ``samples.jsonl`` (no sample lost or repeated).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

CELL_SCHEMA = "melayer.sweep_cell/1"
DONE = "cell.json"

_LOADED: dict[tuple, Any] = {}  # one loaded model per worker process, reused by the worker's next cells


def cell_dir(root: str | Path, cell_id: str) -> Path:
    return Path(root) / "cells" / cell_id


def finished(root: str | Path, cell: dict[str, Any]) -> dict[str, Any] | None:
    """The cell's ``cell.json`` if it finished with exactly these settings (limit and batch size included)."""
    import json

    path = cell_dir(root, cell["id"]) / DONE
    if not path.exists():
        return None
    try:
        done = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    same = done.get("settings") == cell["settings"] and done.get("fingerprint") == cell["fingerprint"]
    return done if same and done.get("status") == "done" else None


def set_threads(threads: int) -> None:
    """Pin a worker to ``threads`` CPU threads (torch intra-op pool and the BLAS/OpenMP libraries it spawns)."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    import torch

    torch.set_num_threads(threads)


def _load(cell: dict[str, Any]):
    from melayer.models.loading import load

    s = cell["settings"]
    key = (cell["model"], s.get("dtype"), str(s.get("arch")), str(s.get("device_map")), str(s.get("max_memory")))
    if key not in _LOADED:
        _LOADED.clear()  # free the previous model before loading the next
        kwargs = {k: s[k] for k in ("device_map", "max_memory") if s.get(k) is not None}
        _LOADED[key] = load(cell["model"], dtype=s.get("dtype", "float32"), arch=s.get("arch"), progress=False,
                            **kwargs)
    return _LOADED[key]


def _me_layer(root: Path, cell: dict[str, Any]) -> int | None:
    """The ME layer from the block (given) or from the model's scan cell (stage 1)."""
    import json

    from melayer.util.errors import MelayerError

    s = cell["settings"]
    if s.get("me_layer") is not None or s.get("layers") is not None:
        return s.get("me_layer")
    scan_id = cell["needs"].get("scan")
    if scan_id is None:
        return None
    path = cell_dir(root, scan_id) / "scan.json"
    if not path.exists():
        raise MelayerError(f"the scan cell {scan_id} has not finished (no {path})")
    me = json.loads(path.read_text()).get("me_layer")
    if me is None:
        raise MelayerError(f"no ME layer found in {cell['model']} (scan cell {scan_id}); give me_layer or layers "
                           "in the sweep spec")
    return int(me)


def _seed_baseline(root: Path, cell: dict[str, Any], out: Path) -> None:
    """Give a compare cell the shared baseline's finished samples, so its rate-0 run has nothing left to do."""
    from melayer.eval.compare import rate_dir
    from melayer.util.io import read_jsonl, write_atomic

    src = cell_dir(root, cell["needs"]["baseline"]) / "samples.jsonl"
    dst = out / rate_dir(0.0) / "samples.jsonl"
    if src.exists() and (not dst.exists() or len(read_jsonl(dst)) < len(read_jsonl(src))):
        write_atomic(dst, lambda p: shutil.copyfile(src, p))


def _finetune(cell: dict[str, Any], out: Path) -> dict[str, Any]:
    """A ``melayer.finetune`` run in the cell directory; ``resume=True`` continues a killed cell from its last
    checkpoint (or starts fresh). The run loads its own model (it trains it in place) and, unless the block
    gives ``me_layer`` or ``layers``, finds the ME layer on the training text as the trainer formats it."""
    from melayer.util.errors import MelayerError

    try:
        from melayer.finetuning import finetune
    except ImportError:
        raise MelayerError("finetune cells need melayer.finetune, which this installation does not have (pip install melayer[finetune])") from None
    s = cell["settings"]
    layers = s.get("layers")
    if isinstance(layers, list):
        layers = ",".join(str(x) for x in layers)
    res = finetune(model=cell["model"], method=s["method"], data=s.get("data") or "gsm8k", output=str(out),
                   seed=s["seed"], wemask=s["rate"], select=s.get("select") or "activation", gamma=s["gamma"],
                   layers=layers, me_layer=s.get("me_layer"), dtype=s.get("dtype", "float32"), resume=True, progress=False,
                   **s.get("options", {}))
    return {"result": "finetune.json", "final_loss": getattr(res, "final_loss", None)}


def _run(root: Path, cell: dict[str, Any], out: Path) -> dict[str, Any]:
    """Run the cell's command; returns a small summary for cell.json."""
    from melayer.interventions.wemask import wemask
    from melayer.reporting.results import analyses
    from melayer.util.io import write_json

    s = cell["settings"]
    if cell["command"] == "finetune":
        return _finetune(cell, out)
    lm = _load(cell)
    kind = analyses().get(cell["command"])
    if kind is not None:  # a registered analysis: its function, its file
        from melayer.util.io import read_prompts

        prompts = read_prompts(s["prompts"]) if s.get("prompts") else None
        result = kind.run_function()(lm, prompts, batch_size=s.get("batch_size", 8), progress=False,
                                     **s.get("options", {}))
        data = result.to_dict()
        write_json(out / kind.file, data)
        return {"me_layer": data.get("me_layer"), "result": kind.file}
    from melayer.eval import run
    from melayer.eval.compare import compare

    run_kwargs = {k: s[k] for k in ("max_new_tokens", "chat") if s.get(k) is not None}
    if s.get("method"):
        return _run_method(root, cell, out, lm, run_kwargs)
    if cell["command"] == "eval":
        intervention = None
        if s["rate"] > 0:
            me = _me_layer(root, cell)
            intervention = wemask(lm, s["rate"], layers=s.get("layers"), select=s["select"], gamma=s["gamma"],
                                  me_layer=me)  # re-entered around every model call
        res = run(lm, s["task"], limit=s.get("limit"), batch_size=s["batch_size"], output=out,
                  intervention=intervention, progress=False, **run_kwargs, **s.get("task_options", {}))
        return {"primary_metric": res.primary, "value": res.metrics[res.primary]["value"], "result": "eval.json"}
    # compare: the baseline's samples first, then rate 0 (nothing left to do) and rate r, paired
    _seed_baseline(root, cell, out)
    paired = compare(lm, s["task"], [0.0, s["rate"]], limit=s.get("limit"), batch_size=s["batch_size"],
                     output=out, select=s["select"], layers=s.get("layers"), gamma=s["gamma"],
                     me_layer=_me_layer(root, cell), sinks=s.get("sinks", True), n_boot=s.get("n_boot", 2000),
                     seed=s["seed"], progress=False, **run_kwargs, **s.get("task_options", {}))
    return {"me_layer": paired.me_layer, "result": "compare.json"}


def _run_method(root: Path, cell: dict[str, Any], out: Path, lm: Any, run_kwargs: dict[str, Any]) -> dict[str, Any]:
    """An eval or compare cell whose condition is a registered intervention (``method`` in the spec): bound with
    the calibration :func:`melayer.eval.compare.compare` uses (task items outside the evaluated ones)."""
    from melayer.eval import run
    from melayer.eval.compare import calibration_for, compare
    from melayer.eval.tasks import get_task
    from melayer.interventions.methods import parse_method

    s = cell["settings"]
    me = _me_layer(root, cell)
    if cell["command"] == "eval":
        task = get_task(s["task"], **s.get("task_options", {}))
        samples = task.load(s.get("limit"), lm=lm)
        iv = parse_method(s["method"]).bind(lm, calibration_for(lm, task, samples, me))
        res = run(lm, task, limit=s.get("limit"), batch_size=s["batch_size"], output=out, intervention=iv,
                  progress=False, samples=samples, **run_kwargs)
        return {"primary_metric": res.primary, "value": res.metrics[res.primary]["value"], "result": "eval.json"}
    _seed_baseline(root, cell, out)
    cmp = compare(lm, s["task"], [0.0], limit=s.get("limit"), batch_size=s["batch_size"], output=out, me_layer=me,
                  sinks=s.get("sinks", True), n_boot=s.get("n_boot", 2000), seed=s["seed"], progress=False,
                  methods=[s["method"]], **run_kwargs, **s.get("task_options", {}))
    return {"me_layer": cmp.me_layer, "result": "compare.json"}


def run_cell(cell: dict[str, Any], root: str, threads: int | None = None) -> dict[str, Any]:
    """Run one cell unless it has finished already; returns its ``cell.json`` (status done / failed).

    A :class:`melayer.MelayerError` (bad input for this cell) is reported as a failed cell; anything
    else propagates, so the engine records it (and retries it where it is configured to).
    """
    from melayer.util.errors import MelayerError
    from melayer.util.io import write_json

    if threads:
        set_threads(threads)
    done = finished(root, cell)
    if done is not None:
        return {**done, "skipped": True}
    out = cell_dir(root, cell["id"])
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    record = {"schema": CELL_SCHEMA, "id": cell["id"], "command": cell["command"], "model": cell["model"],
              "fingerprint": cell["fingerprint"], "settings": cell["settings"], "needs": cell["needs"],
              "host": os.uname().nodename, "pid": os.getpid()}
    try:
        summary = _run(Path(root), cell, out)
    except MelayerError as exc:
        return {**record, "status": "failed", "error": str(exc), "elapsed_s": round(time.time() - t0, 2)}
    record.update(status="done", summary=summary, elapsed_s=round(time.time() - t0, 2))
    write_json(out / DONE, record)
    return {**record, "skipped": False}
