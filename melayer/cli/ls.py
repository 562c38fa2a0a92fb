"""``melayer ls tasks|archs|methods``: what melayer can run, read from its registries."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

import typer

from melayer.cli import app


class Listing(StrEnum):
    """What ``melayer ls`` lists."""

    tasks = "tasks"
    archs = "archs"
    methods = "methods"


def _rows() -> dict[str, Any]:
    return {"tasks": _tasks, "archs": _archs, "methods": _methods}


def _tasks() -> list[dict[str, str]]:
    from melayer.eval.tasks import REGISTRY

    return [{"task": name, "family": d["family"], "metrics": ", ".join(d["metrics"]),
             "options": ", ".join(d["options"]) or "-", "description": d["description"]}
            for name, d in ((name, spec.describe()) for name, spec in REGISTRY.items())]


def _archs() -> list[dict[str, str]]:
    from melayer.models.archmap import describe_architectures

    return describe_architectures()


def _methods() -> list[dict[str, str]]:
    from melayer.interventions.methods import describe_methods

    return [{"method": m["name"], "params": ", ".join(f"{k}={v['default']}" for k, v in m["params"].items()) or "-",
             "finetune": "yes" if m["in_training"] == "yes" else "no", "description": m["description"]}
            for m in describe_methods()]


def table(rows: list[dict[str, str]]) -> list[str]:
    """Rows as aligned text lines, header first; the last column is left unpadded."""
    if not rows:
        return []
    keys = list(rows[0])
    width = {k: max(len(k), *(len(str(r[k])) for r in rows)) for k in keys[:-1]}
    line = lambda r: "  ".join([*(str(r[k]).ljust(width[k]) for k in keys[:-1]), str(r[keys[-1]])])  # noqa: E731
    return [line({k: k for k in keys}), *(line(r) for r in rows)]


@app.command("ls")
def ls(what: Annotated[Listing, typer.Argument(help="tasks (eval/compare --task), archs (mapped model families) or "
                                                     "methods (interventions)")]) -> None:
    """List the tasks, the mapped architectures or the interventions melayer knows."""
    for text in table(_rows()[str(what)]()):
        typer.echo(text.rstrip())
