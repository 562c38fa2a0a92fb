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

    n = n_prompts(n_prompts_, DEFAULT_PROMPTS)
    texts = prompts_from(None, prompts, limit=n)
    run_analysis(kind="rigidity", output=output, model=model, dtype=dtype, arch=arch, placement=(device_map, max_memory),
                 run=lambda lm: run_rigidity(lm, texts, n_prompts=n, batch_size=batch_size), plots=plots, report=report)
