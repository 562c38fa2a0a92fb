"""``melayer rigidity``."""

from __future__ import annotations

from pathlib import Path

from melayer.cli import app
from melayer.cli.common import (
    ArchOpt,
    AutoBatchOpt,
    DeviceMapOpt,
    Dtype,
    DtypeOpt,
    MaxMemoryOpt,
    ModelOpt,
    NPromptsOpt,
    OutputOpt,
    PlotsOpt,
    PromptsOpt,
    ReportOpt,
    n_prompts,
    prompts_from,
    run_analysis,
)


@app.command()
def rigidity(
    model: ModelOpt = None,
    prompts: PromptsOpt = None,
    output: OutputOpt = Path("out/rigidity"),
    n_prompts_: NPromptsOpt = None,
    batch_size: AutoBatchOpt = None,
    dtype: DtypeOpt = Dtype.float32,
    arch: ArchOpt = None,
    device_map: DeviceMapOpt = None,
    max_memory: MaxMemoryOpt = None,
    plots: PlotsOpt = True,
    report: ReportOpt = False,
) -> None:
    """Rigidity of the massive token, cross-input invariance, diversity of attention inputs -> DIR/rigidity.json + PNG."""
    from melayer.analysis.rigidity import DEFAULT_PROMPTS
    from melayer.analysis.rigidity import rigidity as run_rigidity
    from melayer.report import plots_analysis as P
    from melayer.report.summary_analysis import print_rigidity

    texts = prompts_from(None, prompts)
    n = n_prompts(n_prompts_, DEFAULT_PROMPTS)
    run_analysis(output=output, model=model, dtype=dtype, arch=arch, placement=(device_map, max_memory), json_name="rigidity.json",
                 run=lambda lm: run_rigidity(lm, texts, n_prompts=n, batch_size=batch_size), render=print_rigidity,
                 plots=[(P.rigidity_plot, "rigidity.png")] if plots else [], report=report)
