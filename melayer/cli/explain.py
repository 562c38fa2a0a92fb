"""``melayer explain``, ``melayer rigidity`` and ``melayer sinks``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from melayer.cli import app
from melayer.cli.common import ArchOpt, DtypeOpt, ModelOpt, OutputOpt, PromptOpt, PromptsOpt, prompts_from

NPromptsOpt = Annotated[Optional[int], typer.Option("--n-prompts", help="use the first N prompts (0 = all)")]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="prompts per forward pass")]
PlotsOpt = Annotated[bool, typer.Option(help="write PNG plots")]


def _n(value: int | None, default: int | None) -> int | None:
    from melayer.util.errors import MelayerError

    if value is None:
        return default
    if value < 0:
        raise MelayerError("--n-prompts must be >= 0")
    return value or None


@app.command()
def explain(
    model: ModelOpt = None,
    prompt: PromptOpt = None,
    prompts: PromptsOpt = None,
    output: OutputOpt = Path("out/explain"),
    n_prompts: NPromptsOpt = None,
    max_neurons: Annotated[int, typer.Option(help="at most this many top FFN neurons are ablated")] = 8,
    share: Annotated[float, typer.Option(help="pick the fewest neurons covering this share of each massive dim's FFN output")] = 0.9,
    random_draws: Annotated[int, typer.Option(help="random-neuron control ablations (same size, fixed seed)")] = 3,
    seed: Annotated[int, typer.Option(help="seed of the random-neuron control")] = 0,
    ppl_tokens: Annotated[int, typer.Option(help="perplexity on the first N tokens of the shipped text (0 = all of it, ~2.7k)")] = 1024,
    batch_size: BatchOpt = 8,
    dtype: DtypeOpt = "float32",
    arch: ArchOpt = None,
    plots: PlotsOpt = True,
) -> None:
    """Explain the ME layer causally: branch decomposition, neuron attribution, norm gains, full-factorial
    ablation with controls -> DIR/explain.json + PNGs."""
    import melayer
    from melayer.analysis.explain import DEFAULT_PROMPTS
    from melayer.analysis.explain import explain as run_explain
    from melayer.util.errors import MelayerError
    from melayer.report import plots_analysis as P
    from melayer.util.io import write_json
    from melayer.report.summary_analysis import print_explain

    if ppl_tokens < 0:
        raise MelayerError("--ppl-tokens must be >= 0")
    texts = prompts_from(prompt, prompts)
    lm = melayer.load(model, dtype=dtype, arch=arch)
    result = run_explain(lm, texts, n_prompts=_n(n_prompts, DEFAULT_PROMPTS), share=share, max_neurons=max_neurons,
                         random_draws=random_draws, seed=seed, ppl_tokens=ppl_tokens or None, batch_size=batch_size)
    data = result.to_dict()
    print_explain(data)
    write_json(output / "explain.json", data)
    if plots:
        P.explain_mechanism(data, output / "explain_mechanism.png")
        P.explain_norm_gains(data, output / "explain_norm_gains.png")
        P.explain_ablations(data, output / "explain_ablations.png")
    typer.echo(f"wrote {output / 'explain.json'}")


@app.command()
def rigidity(
    model: ModelOpt = None,
    prompts: PromptsOpt = None,
    output: OutputOpt = Path("out/rigidity"),
    n_prompts: NPromptsOpt = None,
    batch_size: BatchOpt = 8,
    dtype: DtypeOpt = "float32",
    arch: ArchOpt = None,
    plots: PlotsOpt = True,
) -> None:
    """Rigidity of the massive token, cross-input invariance, diversity of attention inputs -> DIR/rigidity.json + PNG."""
    import melayer
    from melayer.analysis.rigidity import DEFAULT_PROMPTS
    from melayer.analysis.rigidity import rigidity as run_rigidity
    from melayer.report import plots_analysis as P
    from melayer.util.io import write_json
    from melayer.report.summary_analysis import print_rigidity

    texts = prompts_from(None, prompts)
    lm = melayer.load(model, dtype=dtype, arch=arch)
    result = run_rigidity(lm, texts, n_prompts=_n(n_prompts, DEFAULT_PROMPTS), batch_size=batch_size)
    data = result.to_dict()
    print_rigidity(data)
    write_json(output / "rigidity.json", data)
    if plots:
        P.rigidity_plot(data, output / "rigidity.png")
    typer.echo(f"wrote {output / 'rigidity.json'}")


@app.command()
def sinks(
    model: ModelOpt = None,
    prompt: PromptOpt = None,
    prompts: PromptsOpt = None,
    output: OutputOpt = Path("out/sinks"),
    n_prompts: NPromptsOpt = None,
    windows: Annotated[int, typer.Option(help="without --prompts: this many 64-token windows of the shipped WikiText-2 excerpt (Gu et al.'s T=64 setting)")] = 32,
    epsilon: Annotated[float, typer.Option(help="a head sinks on a token if its mean attention to it exceeds this")] = 0.3,
    max_tokens: Annotated[int, typer.Option(help="truncate prompts to this many tokens (Gu et al.: 64; 0 = no limit)")] = 64,
    min_tokens: Annotated[int, typer.Option(help="skip prompts shorter than this (short prompts inflate the score; 0 = keep all)")] = 16,
    batch_size: BatchOpt = 8,
    dtype: DtypeOpt = "float32",
    arch: ArchOpt = None,
    plots: PlotsOpt = True,
) -> None:
    """Attention sinks per layer and head (Gu et al. metric), first sink layer vs the ME layer -> DIR/sinks.json + PNG."""
    import melayer
    from melayer.analysis.explain import massive_dims_at, massive_positions
    from melayer.analysis.sinks import measure_sinks, text_windows
    from melayer.util.errors import MelayerError
    from melayer.report import plots_analysis as P
    from melayer.util.io import write_json
    from melayer.report.summary_analysis import print_sinks

    if max_tokens < 0 or min_tokens < 0:
        raise MelayerError("--max-tokens and --min-tokens must be >= 0")
    if windows < 1:
        raise MelayerError("--windows must be >= 1")
    texts = prompts_from(prompt, prompts)
    lm = melayer.load(model, dtype=dtype, arch=arch)
    source = "prompts"
    if texts is None:
        texts = text_windows(lm, windows, max_tokens or 64)
        source = f"{len(texts)} windows of {max_tokens or 64} tokens of melayer/data/ppl_text.txt (WikiText-2 test excerpt)"
    n = _n(n_prompts, None)
    texts = texts[:n] if n else texts
    found = melayer.scan(lm, texts, batch_size=batch_size)
    positions = None
    if found.me_layer is not None:
        dims, _ = massive_dims_at(found, found.me_layer)
        positions = massive_positions(found, found.me_layer, dims)
    result = measure_sinks(lm, texts, epsilon, massive_positions=positions, max_tokens=max_tokens or None,
                           min_tokens=min_tokens or None, batch_size=batch_size, me_layer=found.me_layer, progress=True)
    result.extra["source"] = source
    data = result.to_dict()
    print_sinks(data)
    write_json(output / "sinks.json", data)
    if plots:
        P.sinks_heatmap(data, output / "sinks_heatmap.png")
    typer.echo(f"wrote {output / 'sinks.json'}")
