"""Sweeps: a declarative grid (models x commands x tasks x rates x select rules x seeds) run as independent,
resumable cells on a process pool, a Slurm cluster (submitit) or a Ray cluster, and one table across them.

>>> import melayer
>>> result = melayer.sweep("examples/sweep.yaml", executor="local")   # the same function as melayer.sweeps.run
>>> table = melayer.sweeps.aggregate(result.output)

See :mod:`melayer.sweeps.spec` for the spec, :mod:`melayer.sweeps.executors` for the executors and
:mod:`melayer.sweeps.table` for the table.
"""

from __future__ import annotations

from melayer.sweeps.executors import EXECUTORS, ExecutorOptions
from melayer.sweeps.runner import SweepResult, run
from melayer.sweeps.spec import Cell, expand, read_spec
from melayer.sweeps.table import aggregate

__all__ = ["EXECUTORS", "Cell", "ExecutorOptions", "SweepResult", "aggregate", "expand", "read_spec", "run"]
