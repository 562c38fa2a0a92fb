"""Sweeps: a declarative grid (models x commands x tasks x rates x select rules x seeds) run as independent,
resumable cells on a process pool, a Slurm cluster (submitit) or a Ray cluster, and one table across them.

>>> import melayer.sweep
>>> result = melayer.sweep("examples/sweep.yaml", executor="local")      # or melayer.sweep.run(...)
>>> table = melayer.sweep.aggregate(result.output)

See :mod:`melayer.sweep.spec` for the spec, :mod:`melayer.sweep.executors` for the executors and
:mod:`melayer.sweep.table` for the table.
"""

from __future__ import annotations

import sys
import types

from melayer.sweep.executors import EXECUTORS, ExecutorOptions
from melayer.sweep.runner import SweepResult, run
from melayer.sweep.spec import Cell, expand, read_spec
from melayer.sweep.table import aggregate

__all__ = ["EXECUTORS", "Cell", "ExecutorOptions", "SweepResult", "aggregate", "expand", "read_spec", "run"]


class _CallableModule(types.ModuleType):
    """``melayer.sweep(...)`` is ``melayer.sweep.run(...)``."""

    def __call__(self, *args, **kwargs) -> SweepResult:
        return run(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
