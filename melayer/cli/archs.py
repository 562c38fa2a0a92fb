"""``melayer archs``: every causal-LM model type of the installed transformers and how melayer covers it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from melayer.cli import app


@app.command()
def archs(
    types: Annotated[Optional[list[str]], typer.Argument(help="model types to check (default: every causal-LM type)")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="also write the rows to this JSON file")] = None,
    markdown: Annotated[bool, typer.Option("--markdown", help="print a Markdown table (as in the docs)")] = False,
) -> None:
    """Build each model type from its default config shrunk to tiny sizes, derive its roles, plant a massive
    activation through them and check it is found: validated / refused (why) / not built / excluded."""
    from collections import Counter

    import transformers

    from melayer.models.coverage import coverage, coverage_markdown
    from melayer.util.io import write_json

    rows = coverage(types, progress=True)
    if json_out is not None:
        write_json(json_out, rows)
    if markdown:
        typer.echo(coverage_markdown(rows), nl=False)
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table("model type", "status", "block", "why", title=f"transformers {transformers.__version__}")
        for r in rows:
            table.add_row(r["model_type"], r["status"], r.get("block", ""), r.get("reason", ""))
        Console().print(table)
    count = Counter(r["status"] for r in rows)
    typer.echo(f"{len(rows)} model types: " + ", ".join(f"{v} {k}" for k, v in sorted(count.items())))
