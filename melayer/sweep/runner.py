"""``melayer.sweep.run``: expand a spec, skip finished cells, run the rest stage by stage on an executor."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from melayer.sweep.cell import finished
from melayer.sweep.executors import EXECUTORS, RUNNERS, ExecutorOptions
from melayer.sweep.spec import SCHEMA, expand, read_spec
from melayer.util.errors import MelayerError

STATE = "sweep.json"


@dataclass
class SweepResult:
    output: str
    executor: str
    cells: list[dict[str, Any]]  # expanded cells
    records: dict[str, dict[str, Any]] = field(default_factory=dict)  # cell id -> its record from this run
    skipped: list[str] = field(default_factory=list)  # finished before this run
    elapsed_s: float = 0.0

    @property
    def ran(self) -> list[str]:
        return [i for i, r in self.records.items() if r.get("status") == "done" and not r.get("skipped")]

    @property
    def failed(self) -> dict[str, str]:
        return {i: r.get("error", "") for i, r in self.records.items() if r.get("status") != "done"}

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "output": self.output, "executor": self.executor, "n_cells": len(self.cells),
                "skipped": self.skipped, "ran": self.ran, "failed": self.failed,
                "elapsed_s": round(self.elapsed_s, 2), "cells": self.cells}


def run(
    spec: str | Path | dict[str, Any],
    output: str | Path | None = None,
    executor: str = "local",
    *,
    options: ExecutorOptions | None = None,
    report=None,
    dry_run: bool = False,
) -> SweepResult:
    """Run every cell of ``spec`` (a YAML file or a parsed dict) that has not finished under ``output``.

    Stage 1 (scans, rate-0 baselines) runs before stage 2 (everything that uses them). A failed cell does not
    stop the others; :attr:`SweepResult.failed` lists them, and the next run retries only what is missing.
    """
    from melayer.util.io import write_json

    t0 = time.time()
    if executor not in EXECUTORS:
        raise MelayerError(f"unknown executor {executor!r}; use one of {', '.join(EXECUTORS)}")
    data = read_spec(spec) if not isinstance(spec, dict) else spec
    root = Path(output or data.get("output") or "")
    if not str(output or data.get("output") or ""):
        raise MelayerError("no output directory: give --output or 'output' in the spec")
    cells = [c.to_dict() for c in expand(data)]
    opts = options or ExecutorOptions()
    result = SweepResult(output=str(root), executor=executor, cells=cells)
    result.skipped = [c["id"] for c in cells if finished(root, c) is not None]
    if dry_run:
        return result
    root.mkdir(parents=True, exist_ok=True)
    write_json(root / STATE, {**result.to_dict(), "spec": data})
    report = report or (lambda rec: None)
    for stage in sorted({c["stage"] for c in cells}):
        todo = [c for c in cells if c["stage"] == stage and c["id"] not in result.skipped]
        blocked = {c["id"] for c in todo if any(n in result.failed for n in c["needs"].values())}
        for c in todo:
            if c["id"] in blocked:
                result.records[c["id"]] = {"id": c["id"], "status": "failed", "error": "a cell it needs failed"}
        todo = [c for c in todo if c["id"] not in blocked]
        if todo:
            for rec in RUNNERS[executor](todo, root, opts, report):
                result.records[rec["id"]] = rec
    result.elapsed_s = time.time() - t0
    write_json(root / STATE, {**result.to_dict(), "spec": data})
    return result
