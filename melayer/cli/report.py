"""``melayer report``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from melayer.cli import app


@app.command()
def report(
    dirs: Annotated[list[Path], typer.Argument(help="directories (searched two levels deep) or JSON files written by melayer commands")],
    output: Annotated[Path, typer.Option("--output", "-o", help="the HTML file to write")] = Path("report.html"),
    interactive: Annotated[bool, typer.Option("--interactive", help="also inline plotly's bundled JavaScript (~5 MB) for hover and zoom")] = False,
    title: Annotated[str | None, typer.Option(help="page title (default: melayer report: <models>)")] = None,
) -> None:
    """One self-contained HTML page (no external asset, no network) from the outputs of scan, explain, rigidity,
    sinks, eval, compare and finetune found in DIR... -> FILE."""
    from melayer.reporting.page import check_output, html

    check_output(output)
    html(*dirs, output=output, interactive=interactive, title=title)
    typer.echo(f"wrote {output}")
