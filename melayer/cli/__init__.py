"""The ``melayer`` command: a thin layer over the Python API.

Each module in this package registers its commands on :data:`app`; they are all imported here.
Every :class:`~melayer.errors.MelayerError` becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

import typer

from melayer.util.errors import MelayerError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Find where massive activations are born (the ME layer), explain them, measure sinks, fix them.")


@app.callback()
def _root() -> None:
    """melayer: massive activations, the ME layer, attention sinks and WeMask."""


for _mod in pkgutil.iter_modules(__path__):
    if _mod.name not in ("common", "eval_options"):  # helpers; every other module is one command
        importlib.import_module(f"{__name__}.{_mod.name}")


def main() -> None:
    try:
        app()
    except MelayerError as exc:
        typer.echo(f"melayer: error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("melayer: interrupted", err=True)
        sys.exit(130)
