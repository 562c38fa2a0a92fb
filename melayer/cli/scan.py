"""``melayer scan``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from melayer.cli import app
from melayer.cli.common import Given, OutputOpt, run_analysis, shared_options


@app.command()
@shared_options("model prompt prompts output dtype arch device_map max_memory batch_size abs_min median_ratio "
                "persist_ratio persist_frac plots report")
def scan(
    given: Given,
    output: OutputOpt = Path("out/scan"),
    abs_min: Annotated[float, typer.Option(help="massive if |a| > this ...")] = 100.0,
    median_ratio: Annotated[float, typer.Option(help="... and |a| > this x the layer's median |a|")] = 1000.0,
    persist_ratio: Annotated[float, typer.Option(help="a massive (token, dim) persists while |a| > this x the median")] = 100.0,
    persist_frac: Annotated[float, typer.Option(help="share of later layers a massive (token, dim) must persist in")] = 0.75,
) -> None:
    """Scan a model for massive activations and locate its ME layer -> DIR/scan.json + PNGs."""
    from melayer.analysis.criterion import Criterion
    from melayer.analysis.scan import scan

    _, texts = given.texts(None)
    crit = Criterion(abs_min=abs_min, median_ratio=median_ratio, persist_ratio=persist_ratio,
                     persist_frac=persist_frac)
    run_analysis("scan", output, given, lambda lm: scan(lm, texts, criterion=crit, batch_size=given.batch_size))
