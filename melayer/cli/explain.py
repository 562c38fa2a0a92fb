"""``melayer explain``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from melayer.cli import app
from melayer.cli.common import Given, OutputOpt, run_analysis, shared_options
from melayer.util.errors import MelayerError


@app.command()
@shared_options("model prompt prompts output n_prompts_ max_neurons share random_draws seed ppl_tokens batch_size dtype "
                "arch device_map max_memory plots report")
def explain(
    given: Given,
    output: OutputOpt = Path("out/explain"),
    max_neurons: Annotated[int, typer.Option(help="at most this many top FFN neurons are ablated")] = 8,
    share: Annotated[float, typer.Option(help="pick the fewest neurons covering this share of each massive dim's FFN output")] = 0.9,
    random_draws: Annotated[int, typer.Option(help="random-neuron control ablations (same size, fixed seed)")] = 3,
    seed: Annotated[int, typer.Option(help="seed of the random-neuron control")] = 0,
    ppl_tokens: Annotated[int, typer.Option(help="perplexity on the first N tokens of the shipped text (0 = all of it, ~2.7k)")] = 1024,
) -> None:
    """Explain the ME layer causally: branch decomposition, neuron attribution, norm gains, full-factorial
    ablation with controls -> DIR/explain.json + PNGs."""
    from melayer.interventions.explain import DEFAULT_PROMPTS
    from melayer.interventions.explain import explain as run_explain

    if ppl_tokens < 0:
        raise MelayerError("--ppl-tokens must be >= 0")
    n, texts = given.texts(DEFAULT_PROMPTS)
    run_analysis("explain", output, given,
                 lambda lm: run_explain(lm, texts, n_prompts=n, share=share, max_neurons=max_neurons,
                                        random_draws=random_draws, seed=seed, ppl_tokens=ppl_tokens or None,
                                        batch_size=given.batch_size))
