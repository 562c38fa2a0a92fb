"""``melayer weights``: data-free ME-layer candidates from the weights (optionally confirmed by a short scan)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from melayer.cli import app
from melayer.cli.common import (
    ArchOpt,
    Dtype,
    DtypeOpt,
    NPromptsOpt,
    OutputOpt,
    PlotsOpt,
    PromptOpt,
    PromptsOpt,
    ReportOpt,
    check_output,
    dtype_name,
    finish,
    n_prompts,
    prompts_from,
)


@app.command()
def weights(
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="gemma-3-270m (default), smollm2-135m, a .gguf file or a local HF directory (weights are read from local files only)")] = None,
    output: OutputOpt = Path("out/weights"),
    arch: ArchOpt = None,
    top_k: Annotated[int, typer.Option(help="layers listed (those writing most into the massive dim)")] = 10,
    n_tokens: Annotated[int, typer.Option(help="vocabulary ids followed as first token when the tokenizer adds no BOS")] = 16,
    threads: Annotated[Optional[int], typer.Option(help="threads reading and reducing blocks of each tensor (default: the CPUs, at most 4)")] = None,
    confirm: Annotated[bool, typer.Option("--confirm", help="load the model and check the candidates with a short scan of their layers")] = False,
    prompt: PromptOpt = None,
    prompts: PromptsOpt = None,
    n_prompts_: NPromptsOpt = None,
    dtype: DtypeOpt = Dtype.float32,
    plots: PlotsOpt = True,
    report: ReportOpt = False,
) -> None:
    """Predict the ME layer, massive dim and neuron from the weights alone (the first token's path) -> DIR/weights.json + PNG."""
    from melayer.analysis.weights import weights as rank

    check_output(output)
    count = n_prompts(n_prompts_, 8)
    texts = prompts_from(prompt, prompts, limit=count)
    result = rank(model, arch=arch, top_k=top_k, n_tokens=n_tokens, threads=threads, confirm=confirm, prompts=texts,
                  n_prompts=count or 10**9, dtype=dtype_name(dtype))
    finish(result.to_dict(), output, "weights", plots, report=report)
