"""``melayer weights``: data-free ME-layer candidates from the weights (optionally confirmed by a short scan)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from melayer.cli import app
from melayer.cli.common import Given, OutputOpt, check_output, dtype_name, finish, shared_options


@app.command()
@shared_options("model output arch top_k n_tokens threads confirm prompt prompts n_prompts_ dtype plots report")
def weights(
    given: Given,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="gemma-3-270m (default), smollm2-135m, a .gguf file or a local HF directory (weights are read from local files only)")] = None,
    output: OutputOpt = Path("out/weights"),
    top_k: Annotated[int, typer.Option(help="layers listed (those writing most into the massive dim)")] = 10,
    n_tokens: Annotated[int, typer.Option(help="vocabulary ids followed as first token when the tokenizer adds no BOS")] = 16,
    threads: Annotated[Optional[int], typer.Option(help="threads reading and reducing blocks of each tensor (default: the CPUs, at most 4)")] = None,
    confirm: Annotated[bool, typer.Option("--confirm", help="load the model and check the candidates with a short scan of their layers")] = False,
) -> None:
    """Predict the ME layer, massive dim and neuron from the weights alone (the first token's path) -> DIR/weights.json + PNG."""
    from melayer.analysis.weights import weights as rank

    check_output(output)
    count, texts = given.texts(8)
    result = rank(model, arch=given.arch, top_k=top_k, n_tokens=n_tokens, threads=threads, confirm=confirm,
                  prompts=texts, n_prompts=count or 10**9, dtype=dtype_name(given.dtype))
    finish(result.to_dict(), output, "weights", given.plots, report=given.report)
