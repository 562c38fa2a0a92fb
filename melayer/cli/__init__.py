"""The ``melayer`` command: a thin layer over the Python API.

Each module in this package registers its commands on :data:`app`; they are all imported here.
Every :class:`~melayer.util.errors.MelayerError` becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import importlib
import pkgutil
import shlex
import sys

import typer
from typer.core import TyperGroup

from melayer.util.console import plain
from melayer.util.errors import Interrupted, MelayerError
from melayer.util.io import DISK_ERRNOS, disk_error


class _Interrupt(Exception):
    """A Ctrl-C inside a command, carried past click (which turns it into a bare exit code) to :func:`main`."""

    def __init__(self, interrupt: KeyboardInterrupt) -> None:
        super().__init__()
        self.interrupt = interrupt


class Group(TyperGroup):
    """melayer's command groups: a Ctrl-C inside a command reaches :func:`main` with what it left on disk."""

    def invoke(self, ctx: typer.Context) -> object:  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as exc:
            raise _Interrupt(exc) from exc


app = typer.Typer(cls=Group, add_completion=False, pretty_exceptions_enable=False,
                  help="Find where massive activations are born (the ME layer), explain them, measure sinks, fix them.")


def help_without_command(ctx: typer.Context) -> None:
    """A group called without a command prints its help (exit 2, as for any incomplete command line)."""
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())
        raise typer.Exit(2)


@app.callback(invoke_without_command=True)
def _root(ctx: typer.Context) -> None:
    """melayer: massive activations, the ME layer, attention sinks and WeMask."""
    help_without_command(ctx)


for _mod in pkgutil.iter_modules(__path__):
    if _mod.name not in ("common", "eval_options"):  # helpers; every other module is one command
        importlib.import_module(f"{__name__}.{_mod.name}")


def usage_line(exc: typer.TyperException) -> str:
    """A bad option or argument as the one error line: click's message and where the help is."""
    ctx = getattr(exc, "ctx", None)
    where = f" (see: {ctx.command_path} --help)" if ctx is not None else ""
    return f"melayer: error: {' '.join(exc.format_message().split())}{where}"


def _say(line: str) -> None:
    """The one closing line on stderr. Names in it (a path, a model, an option's value) are shown, never obeyed:
    terminal and bidirectional controls print as ``\\uXXXX``, line breaks as spaces."""
    typer.echo(plain(line).replace("\n", " "), err=True)


def main() -> None:
    try:
        code = app(standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)  # as click's standalone mode does
    except typer.TyperException as exc:  # a bad option or argument (click's usage errors)
        _say(usage_line(exc))
        sys.exit(exc.exit_code or 2)
    except typer.Abort:
        _say("melayer: aborted")
        sys.exit(1)
    except _Interrupt as exc:
        _say(interrupted_line(exc.interrupt, sys.argv[1:]))
        sys.exit(130)
    except MelayerError as exc:
        _say(f"melayer: error: {exc}")
        sys.exit(2)
    except OSError as exc:
        # a full disk or read-only file system hit outside melayer's own writers (e.g. the model cache)
        if exc.errno not in DISK_ERRNOS:
            raise
        _say(f"melayer: error: {disk_error(exc.filename or '', exc)}")
        sys.exit(2)
    except KeyboardInterrupt as exc:
        _say(interrupted_line(exc, sys.argv[1:]))
        sys.exit(130)
    except SystemExit as exc:
        # typer turns Ctrl-C into a silent exit 130; find the interrupt it came from and say what it left
        interrupt = _chained_interrupt(exc)
        if interrupt is None:
            raise
        _say(interrupted_line(interrupt, sys.argv[1:]))
        sys.exit(130)


def _chained_interrupt(exc: BaseException) -> KeyboardInterrupt | None:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, KeyboardInterrupt):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


def interrupted_line(exc: KeyboardInterrupt, argv: list[str]) -> str:
    """The one line printed on Ctrl-C: what is saved and, for a resumable run, the command that resumes it (the
    same command without --overwrite, which would discard what was saved)."""
    if not isinstance(exc, Interrupted):
        return "melayer: interrupted; nothing was written (results are only written complete)"
    line = f"melayer: interrupted; {exc.saved}"
    if exc.resumable:
        line += "; resume with: " + shlex.join(["melayer", *(a for a in argv if a != "--overwrite")])
    return line
