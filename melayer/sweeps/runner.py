"""``melayer.sweeps.run``: expand a spec, skip finished cells, run the rest stage by stage on an executor."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from melayer.sweeps.cell import finished
from melayer.sweeps.executors import EXECUTORS, RUNNERS, ExecutorName, ExecutorOptions
from melayer.sweeps.spec import SCHEMA, expand, read_spec
from melayer.util.errors import MelayerError
from melayer.util.results import Result

STATE = "sweep.json"


@dataclass
class SweepResult(Result):
    """What a sweep run did: ``to_dict()`` is what ``sweep.json`` holds and ``from_dict`` (or
    ``SweepResult.load(path)``) reads it back (each cell's own record stays in its ``cell.json``)."""

    kind = "sweep"

    output: str
    executor: ExecutorName
    cells: list[dict[str, Any]]  # expanded cells
    records: dict[str, dict[str, Any]] = field(default_factory=dict)  # cell id -> its record from this run
    skipped: list[str] = field(default_factory=list)  # finished before this run
    elapsed_s: float = 0.0
    spec: dict[str, Any] | None = None  # the parsed spec the sweep ran

    @property
    def ran(self) -> list[str]:
        return [i for i, r in self.records.items() if r.get("status") == "done" and not r.get("skipped")]

    @property
    def failed(self) -> dict[str, str]:
        return {i: r.get("error", "") for i, r in self.records.items() if r.get("status") != "done"}

    def to_dict(self) -> dict[str, Any]:
        """The result as ``sweep.json`` holds it.

        Returns:
            JSON-ready data: the output, the executor, the cells and which ran, were skipped or failed.
        """
        return {"schema": SCHEMA, "output": self.output, "executor": self.executor, "n_cells": len(self.cells),
                "skipped": self.skipped, "ran": self.ran, "failed": self.failed,
                "elapsed_s": round(self.elapsed_s, 2), "cells": self.cells,
                **({"spec": self.spec} if self.spec is not None else {})}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SweepResult:
        """The result a ``sweep.json`` holds; each cell's record keeps only its status (and error).

        Args:
            data: a loaded ``sweep.json`` (what :meth:`to_dict` returned).

        Returns:
            The sweep result.
        """
        records = {i: {"id": i, "status": "done"} for i in data["ran"]}
        records |= {i: {"id": i, "status": "failed", "error": e} for i, e in data["failed"].items()}
        return cls(output=data["output"], executor=data["executor"], cells=data["cells"], records=records,
                   skipped=data["skipped"], elapsed_s=data["elapsed_s"], spec=data.get("spec"))


def run(
    spec: str | Path | dict[str, Any],
    output: str | Path | None = None,
    executor: ExecutorName = "local",
    *,
    options: ExecutorOptions | None = None,
    report: Callable[[dict[str, Any]], None] | None = None,
    dry_run: bool = False,
) -> SweepResult:
    """Run every cell of a sweep that has not finished under ``output`` (``melayer sweep``; ``melayer.sweep``).

    Stage 1 (scans, rate-0 baselines) runs before stage 2 (everything that uses them). A failed cell does not
    stop the others; :attr:`SweepResult.failed` lists them, and the next run retries only what is missing.
    :func:`melayer.sweeps.aggregate` makes one table of the output.

    Args:
        spec: a YAML file or the parsed spec (see :mod:`melayer.sweeps.spec`).
        output: the sweep's directory (default: the spec's ``output``).
        executor: ``"local"`` (a process pool), ``"slurm"`` (submitit) or ``"ray"``.
        options: the executor's settings (workers, threads, Slurm partition, ...).
        report: called with each finished cell's record.
        dry_run: only expand the grid and say what would run.

    Returns:
        The cells, which were skipped (already done), which ran and which failed, as a :class:`SweepResult`.

    Raises:
        MelayerError: a bad spec, an unknown executor or no output directory.
    """

    t0 = time.time()
    if executor not in EXECUTORS:
        raise MelayerError(f"unknown executor {executor!r}; use one of {', '.join(EXECUTORS)}")
    data = read_spec(spec) if not isinstance(spec, dict) else spec
    root = Path(output or data.get("output") or "")
    if not str(output or data.get("output") or ""):
        raise MelayerError("no output directory: give --output or 'output' in the spec")
    cells = [c.to_dict() for c in expand(data)]
    opts = options or ExecutorOptions()
    result = SweepResult(output=str(root), executor=executor, cells=cells, spec=data)
    result.skipped = [c["id"] for c in cells if finished(root, c) is not None]
    if dry_run:
        return result
    root.mkdir(parents=True, exist_ok=True)
    result.save(root / STATE)
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
    result.save(root / STATE)
    return result
