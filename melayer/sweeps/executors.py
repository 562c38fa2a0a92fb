"""Where cells run. Each executor hands a list of cells to an existing engine and returns their records; the
engines do the scheduling, the retries and the logs. No scheduler here.

* ``local``: :class:`concurrent.futures.ProcessPoolExecutor` with the spawn start method; ``workers`` processes of
  ``threads`` torch threads each (default: as many workers as the machine's cores allow at that thread count).
* ``slurm``: submitit job arrays (``map_array``), one array per stage; its ``local`` / ``debug`` clusters run the
  same code on this machine (used by the tests). Logs: ``ROOT/logs/submitit/``.
* ``ray``: one Ray task per cell (``num_cpus=threads``, ``num_gpus``, ``max_retries``) on the cluster at
  ``ray_address``, or on a Ray instance started on this machine when no address is given.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from melayer.sweeps.cell import run_cell, set_threads
from melayer.util.errors import MelayerError

ExecutorName = Literal["local", "slurm", "ray"]  # a process pool, submitit or Ray
EXECUTORS: tuple[ExecutorName, ...] = get_args(ExecutorName)

Report = Callable[[dict[str, Any]], None]


@dataclass
class ExecutorOptions:
    workers: int | None = None  # local: processes (default: cores // threads)
    threads: int = 1  # torch threads per cell
    gpus: float = 0  # per cell (slurm: gpus_per_node, ray: num_gpus)
    ray_address: str | None = None
    slurm_cluster: str | None = None  # None: detect (slurm); "local" / "debug": this machine (tests)
    slurm: dict[str, Any] = field(default_factory=dict)  # extra submitit parameters, e.g. slurm_partition
    timeout_min: int = 240
    retries: int = 0  # ray: max_retries for a task whose worker died


def _failed(cell: dict[str, Any], exc: BaseException, log: str | None = None) -> dict[str, Any]:
    msg = " ".join(f"{type(exc).__name__}: {exc}".split())[:500]
    return {"id": cell["id"], "command": cell["command"], "status": "failed", "error": msg, "log": log}


def _collect(outcomes, report: Report) -> list[dict[str, Any]]:
    """Records from (cell, get result, log path) triples, in the order given; an engine's exception (a bug in the
    cell, a dead worker, a failed job) becomes a failed record and the other cells go on."""
    results = []
    for cell, get, log in outcomes:
        try:
            rec = get()
        except Exception as exc:
            rec = _failed(cell, exc, log)
        report(rec)
        results.append(rec)
    return results


def default_workers(threads: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, threads))


def run_local(cells: list[dict[str, Any]], root: Path, opts: ExecutorOptions, report: Report) -> list[dict[str, Any]]:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    workers = min(len(cells), opts.workers or default_workers(opts.threads))
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=set_threads, initargs=(opts.threads,)) as pool:
        futures = {pool.submit(run_cell, cell, str(root)): cell for cell in cells}
        return _collect(((futures[f], f.result, None) for f in as_completed(futures)), report)


def run_slurm(cells: list[dict[str, Any]], root: Path, opts: ExecutorOptions, report: Report) -> list[dict[str, Any]]:
    try:
        import submitit
    except ImportError:
        raise MelayerError("--executor slurm needs submitit: pip install 'melayer[sweep]'") from None
    folder = root / "logs" / "submitit" / "%j"
    try:
        ex = submitit.AutoExecutor(folder=folder, cluster=opts.slurm_cluster)
    except RuntimeError as exc:  # no Slurm here and no cluster named
        raise MelayerError(f"--executor slurm: {exc} (is this a Slurm login node?)") from None
    params: dict[str, Any] = {"timeout_min": opts.timeout_min, "cpus_per_task": opts.threads, "name": "melayer-sweep",
                              "slurm_array_parallelism": opts.workers or len(cells)}
    if opts.gpus:
        params["gpus_per_node"] = int(opts.gpus)
    params.update(opts.slurm)
    ex.update_parameters(**params)
    jobs = ex.map_array(run_cell, cells, [str(root)] * len(cells), [opts.threads] * len(cells))
    # submitit's FailedJobError carries the job's own traceback; its log is kept next to the job
    return _collect(((cell, job.result, str(job.paths.stderr)) for job, cell in zip(jobs, cells)), report)


def run_ray(cells: list[dict[str, Any]], root: Path, opts: ExecutorOptions, report: Report) -> list[dict[str, Any]]:
    try:
        import ray
    except ImportError:
        raise MelayerError("--executor ray needs ray: pip install 'melayer[ray]'") from None
    started = not ray.is_initialized()
    if started:
        init: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                "runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(opts.threads)}}}
        if opts.ray_address:
            init["address"] = opts.ray_address
        else:  # a Ray instance on this machine, sized like the local pool
            init["num_cpus"] = (opts.workers or default_workers(opts.threads)) * opts.threads
        try:
            ray.init(**init)
        except ConnectionError as exc:
            raise MelayerError(f"cannot reach the Ray cluster at {opts.ray_address}: {exc}") from None
    try:
        task = ray.remote(run_cell).options(num_cpus=opts.threads, num_gpus=opts.gpus, max_retries=opts.retries)
        refs = {task.remote(cell, str(root), opts.threads): cell for cell in cells}


        def finished_first():
            pending = list(refs)
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                yield refs[ready[0]], lambda ref=ready[0]: ray.get(ref), None  # RayTaskError wraps the cell's

        return _collect(finished_first(), report)
    finally:
        if started:
            ray.shutdown()


RUNNERS = {"local": run_local, "slurm": run_slurm, "ray": run_ray}
