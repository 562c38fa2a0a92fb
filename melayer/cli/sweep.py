"""``melayer sweep [run] SPEC`` and ``melayer sweep aggregate DIR``: thin shells over :mod:`melayer.sweeps`."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional, cast

import typer

from melayer.cli import Group, app, help_without_command
from melayer.util.errors import MelayerError

if TYPE_CHECKING:
    from melayer.sweeps.executors import ExecutorName


class _RunByDefault(Group):
    """``melayer sweep SPEC`` is ``melayer sweep run SPEC``: a first argument that is not a subcommand runs a spec."""

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:  # type: ignore[override]
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = ["run", *args]
        return super().parse_args(ctx, args)


sweep_app = typer.Typer(cls=_RunByDefault, add_completion=False, pretty_exceptions_enable=False,
                        help="Run a grid of cells from a spec (melayer sweep SPEC, the same as melayer sweep run SPEC) and "
                             "tabulate a sweep's results (melayer sweep aggregate DIR).")
app.add_typer(sweep_app, name="sweep")


@sweep_app.callback(invoke_without_command=True)
def _sweep_group(ctx: typer.Context) -> None:
    help_without_command(ctx)


class Executor(StrEnum):
    """Where a sweep's cells run."""

    local = "local"
    slurm = "slurm"
    ray = "ray"


def _write_table(root: Path, out: Path | None, plot: bool) -> None:
    from melayer.sweeps.table import aggregate, write

    table = aggregate(root)
    paths = write(table, out or root / "table")
    if plot:
        from melayer.reporting.sweep import sweep_differences

        png = sweep_differences(table, paths["csv"].with_suffix(".png"))
        if png is not None:
            paths["png"] = png
    note = table["multiple_comparisons"]
    typer.echo(f"{len(table['rows'])} rows from {root}; {note['tests']} McNemar tests, BH-adjusted (q = "
               f"{note['alpha']}); {len(table['unfinished_cells'])} cells unfinished")
    for path in paths.values():
        typer.echo(f"wrote {path}")


@sweep_app.command("run")
def sweep(
    spec: Annotated[Path, typer.Argument(help="the sweep spec (YAML): models and run blocks, see examples/sweep.yaml")],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="sweep directory (default: the spec's 'output')")] = None,
    executor: Annotated[Executor, typer.Option("--executor", "-x", help="local (process pool), slurm (submitit job arrays) or ray")] = Executor.local,
    workers: Annotated[Optional[int], typer.Option("--workers", help="local: processes (default cores // threads); slurm: array parallelism")] = None,
    threads: Annotated[int, typer.Option("--threads", help="torch threads per cell")] = 1,
    gpus: Annotated[float, typer.Option("--gpus", help="GPUs per cell (slurm, ray)")] = 0,
    ray_address: Annotated[Optional[str], typer.Option("--ray-address", help="ray: the cluster to join (default: start Ray on this machine)")] = None,
    slurm_cluster: Annotated[Optional[str], typer.Option("--slurm-cluster", help="slurm: submitit cluster (default: detect Slurm; 'local' or 'debug' run here)")] = None,
    partition: Annotated[Optional[str], typer.Option("--partition", help="slurm: partition")] = None,
    timeout_min: Annotated[int, typer.Option("--timeout-min", help="slurm: time limit per cell, minutes")] = 240,
    retries: Annotated[int, typer.Option("--retries", help="ray: retries of a cell whose worker died")] = 0,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="list the cells and which are finished; run nothing")] = False,
    table: Annotated[bool, typer.Option(help="write DIR/table.csv/.json/.png when done")] = True,
) -> None:
    """Run a grid of scan / eval / compare / finetune cells; finished cells are skipped, partial ones resume."""
    import melayer.sweeps as S
    from melayer.cli.common import check_output

    if threads < 1:
        raise MelayerError(f"--threads must be >= 1 (got {threads})")
    if workers is not None and workers < 1:
        raise MelayerError(f"--workers must be >= 1 (got {workers})")
    if output is not None:
        check_output(output)
    opts = S.ExecutorOptions(workers=workers, threads=threads, gpus=gpus, ray_address=ray_address,
                             slurm_cluster=slurm_cluster, timeout_min=timeout_min, retries=retries,
                             slurm={"slurm_partition": partition} if partition else {})

    def report(rec: dict) -> None:
        state = "skipped (finished before)" if rec.get("skipped") else rec.get("status")
        extra = f": {rec.get('error')}" if rec.get("status") != "done" else f" in {rec.get('elapsed_s', 0):.1f} s"
        typer.echo(f"cell {rec['id']}: {state}{extra}", err=True)

    res = S.run(spec, output, cast("ExecutorName", str(executor)), options=opts, report=report, dry_run=dry_run)
    if dry_run:
        for cell in res.cells:
            state = "finished" if cell["id"] in res.skipped else "to run"
            typer.echo(f"stage {cell['stage']}  {state:8s}  {cell['id']}")
        typer.echo(f"{len(res.cells)} cells, {len(res.skipped)} finished")
        return
    typer.echo(f"{len(res.cells)} cells: {len(res.skipped)} finished before, {len(res.ran)} ran, "
               f"{len(res.failed)} failed ({res.elapsed_s:.1f} s) -> {res.output}")
    if table and len(res.failed) < len(res.cells):
        _write_table(Path(res.output), None, plot=True)
    if res.failed:
        first = next(iter(res.failed.items()))
        raise MelayerError(f"{len(res.failed)} cell(s) failed, e.g. {first[0]}: {first[1]}; rerun the same command "
                           "to retry only the missing cells")


@sweep_app.command("aggregate")
@app.command("aggregate", hidden=True)  # the earlier spelling, kept working
def aggregate(
    directory: Annotated[Path, typer.Argument(help="a sweep's output directory")],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="table path without suffix (default DIR/table)")] = None,
    plot: Annotated[bool, typer.Option(help="write a PNG of the paired differences")] = True,
) -> None:
    """One table across a sweep's finished cells -> TABLE.csv + TABLE.json (+ TABLE.png), BH-adjusted."""
    _write_table(directory, output, plot)
