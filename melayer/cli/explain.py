"""``melayer explain``."""

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
    NPromptsOpt,
    OutputOpt,
    PlotsOpt,
    PromptOpt,
    PromptsOpt,
    ReportOpt,
    n_prompts,
    prompts_from,
    run_analysis,
)
from melayer.util.errors import MelayerError


@app.command()
def explain(
    model: ModelOpt = None,
    prompt: PromptOpt = None,
    prompts: PromptsOpt = None,
    output: OutputOpt = Path("out/explain"),
    n_prompts_: NPromptsOpt = None,
    max_neurons: Annotated[int, typer.Option(help="at most this many top FFN neurons are ablated")] = 8,
    share: Annotated[float, typer.Option(help="pick the fewest neurons covering this share of each massive dim's FFN output")] = 0.9,
    random_draws: Annotated[int, typer.Option(help="random-neuron control ablations (same size, fixed seed)")] = 3,
    seed: Annotated[int, typer.Option(help="seed of the random-neuron control")] = 0,
    ppl_tokens: Annotated[int, typer.Option(help="perplexity on the first N tokens of the shipped text (0 = all of it, ~2.7k)")] = 1024,
    batch_size: AutoBatchOpt = None,
    dtype: DtypeOpt = Dtype.float32,
    arch: ArchOpt = None,
    device_map: DeviceMapOpt = None,
    max_memory: MaxMemoryOpt = None,
    plots: PlotsOpt = True,
    report: ReportOpt = False,
) -> None:
    """Explain the ME layer causally: branch decomposition, neuron attribution, norm gains, full-factorial
    ablation with controls -> DIR/explain.json + PNGs."""
    from melayer.interventions.explain import DEFAULT_PROMPTS
    from melayer.interventions.explain import explain as run_explain

    if ppl_tokens < 0:
        raise MelayerError("--ppl-tokens must be >= 0")
    n = n_prompts(n_prompts_, DEFAULT_PROMPTS)
    texts = prompts_from(prompt, prompts, limit=n)
    run_analysis(kind="explain", output=output, model=model, dtype=dtype, arch=arch, placement=(device_map, max_memory),
                 run=lambda lm: run_explain(lm, texts, n_prompts=n, share=share, max_neurons=max_neurons,
                                            random_draws=random_draws, seed=seed, ppl_tokens=ppl_tokens or None,
                                            batch_size=batch_size),
                 plots=plots, report=report)
