"""``melayer scan``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from melayer.cli import app
from melayer.cli.common import (
    ArchOpt,
    AutoBatchOpt,
    DeviceMapOpt,
    Dtype,
    DtypeOpt,
    MaxMemoryOpt,
    ModelOpt,
    OutputOpt,
    PlotsOpt,
    PromptOpt,
    PromptsOpt,
    ReportOpt,
    prompts_from,
    run_analysis,
)


@app.command()
def scan(
    model: ModelOpt = None,
    prompt: PromptOpt = None,
    prompts: PromptsOpt = None,
    output: OutputOpt = Path("out/scan"),
    dtype: DtypeOpt = Dtype.float32,
    arch: ArchOpt = None,
    device_map: DeviceMapOpt = None,
    max_memory: MaxMemoryOpt = None,
    batch_size: AutoBatchOpt = None,
    abs_min: Annotated[float, typer.Option(help="massive if |a| > this ...")] = 100.0,
    median_ratio: Annotated[float, typer.Option(help="... and |a| > this x the layer's median |a|")] = 1000.0,
    persist_ratio: Annotated[float, typer.Option(help="a massive (token, dim) persists while |a| > this x the median")] = 100.0,
    persist_frac: Annotated[float, typer.Option(help="share of later layers a massive (token, dim) must persist in")] = 0.75,
    plots: PlotsOpt = True,
    report: ReportOpt = False,
) -> None:
    """Scan a model for massive activations and locate its ME layer -> DIR/scan.json + PNGs."""
    from melayer.analysis.criterion import Criterion
    from melayer.analysis.scan import scan

    texts = prompts_from(prompt, prompts)
    crit = Criterion(abs_min=abs_min, median_ratio=median_ratio, persist_ratio=persist_ratio,
                     persist_frac=persist_frac)
    run_analysis(kind="scan", output=output, model=model, dtype=dtype, arch=arch, placement=(device_map, max_memory),
                 run=lambda lm: scan(lm, texts, criterion=crit, batch_size=batch_size), plots=plots, report=report)
