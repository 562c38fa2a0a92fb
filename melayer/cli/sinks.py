"""``melayer sinks``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from melayer.cli import app
from melayer.cli.common import Given, OutputOpt, run_analysis, shared_options
from melayer.util.errors import MelayerError


@app.command()
@shared_options("model prompt prompts output n_prompts_ windows epsilon max_tokens min_tokens batch_size dtype arch "
                "device_map max_memory plots report")
def sinks(
    given: Given,
    output: OutputOpt = Path("out/sinks"),
    windows: Annotated[int, typer.Option(help="without --prompts: this many 64-token windows of the shipped WikiText-2 excerpt (Gu et al.'s T=64 setting)")] = 32,
    epsilon: Annotated[float, typer.Option(help="a head sinks on a token if its mean attention to it exceeds this")] = 0.3,
    max_tokens: Annotated[int, typer.Option(help="truncate prompts to this many tokens (Gu et al.: 64; 0 = no limit)")] = 64,
    min_tokens: Annotated[int, typer.Option(help="skip prompts shorter than this (short prompts inflate the score; 0 = keep all)")] = 16,
) -> None:
    """Attention sinks per layer and head (Gu et al. metric), first sink layer vs the ME layer -> DIR/sinks.json + PNG."""
    from melayer.analysis.sinks import sinks as run_sinks

    if max_tokens < 0 or min_tokens < 0:
        raise MelayerError("--max-tokens and --min-tokens must be >= 0")
    if windows < 1:
        raise MelayerError("--windows must be >= 1")
    n, texts = given.texts(None)
    run_analysis("sinks", output, given,
                 lambda lm: run_sinks(lm, texts, windows=windows, epsilon=epsilon, max_tokens=max_tokens,
                                      min_tokens=min_tokens, n_prompts=n, batch_size=given.batch_size))
