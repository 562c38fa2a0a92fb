"""``melayer weights``: data-free ME-layer candidates from the weights (optionally confirmed by a short scan)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from melayer.cli import app
from melayer.cli.common import ArchOpt, DtypeOpt, ModelOpt, OutputOpt, check_output
from melayer.util.errors import MelayerError


@app.command()
def weights(
    model: Annotated[str | None, typer.Argument(help="gemma-3-270m (default), smollm2-135m, a .gguf file or a local HF directory")] = None,
    model_opt: ModelOpt = None,
    output: OutputOpt = Path("out/weights"),
    arch: ArchOpt = None,
    top_k: Annotated[int, typer.Option(help="candidates listed (best layer each)")] = 10,
    persist_frac: Annotated[float, typer.Option(help="the ME layer's top dim must be the top dim of this share of later layers")] = 0.75,
    confirm: Annotated[bool, typer.Option("--confirm", help="load the model and check the prediction with a short scan of the layers around it")] = False,
    prompts: Annotated[int, typer.Option(help="prompts for --confirm")] = 8,
    dtype: DtypeOpt = "float32",
    plots: Annotated[bool, typer.Option(help="write the PNG plot")] = True,
) -> None:
    """Rank (layer, dim, neuron) candidates for the ME layer from the weights alone -> DIR/weights.json + PNG."""
    import melayer
    from melayer.analysis.weights import candidates
    from melayer.analysis.weights import confirm as confirm_fn
    from melayer.report.weights import print_weights, score_plot
    from melayer.util.io import write_json

    if model is not None and model_opt is not None and model != model_opt:
        raise MelayerError("give the model once: as MODEL or as --model")
    model = model or model_opt
    check_output(output)
    result = candidates(model, arch=arch, top_k=top_k, persist_frac=persist_frac)
    if confirm:
        lm = melayer.load(model, dtype=dtype, arch=arch)
        result.confirm = confirm_fn(lm, result, n_prompts=prompts)
    data = result.to_dict()
    print_weights(data)
    write_json(output / "weights.json", data)
    if plots:
        score_plot(data, output / "weights_scores.png")
    typer.echo(f"wrote {output / 'weights.json'}")
