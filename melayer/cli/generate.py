"""``melayer generate``: greedy generation, optionally under WeMask."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from melayer.cli import app
from melayer.cli.common import Given, chat_flag, shared_options
from melayer.util.io import MAX_PROMPT_CHARS


@app.command()
@shared_options("prompt model wemask layers select gamma me_layer max_new_tokens chat method output dtype arch "
                "adapter use_adapter_mask device_map max_memory")
def generate(
    g: Given,
    prompt: Annotated[str, typer.Option("--prompt", "-p", help=f"the prompt text (at most {MAX_PROMPT_CHARS:,} characters)")],
    wemask: Annotated[Optional[float], typer.Option("--wemask", help="WeMask rate: mask k = int(RATE x hidden) dims (0-1)")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="tokens to generate")] = 64,
    method: Annotated[Optional[str], typer.Option("--method", "-M", help="an intervention instead of --wemask: NAME or NAME:key=value,... (see melayer compare --method)")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="also write prompt, text and WeMask settings to this JSON file")] = None,
) -> None:
    """Greedy generation (KV cache) printed to stdout; with --wemask under WeMask (settings on stderr)."""
    import contextlib

    from melayer.cli.common import adapter_mask, check_mask_options, check_output_file
    from melayer.interventions.generate import chat_prompt, greedy_generate
    from melayer.interventions.wemask import WeMask, check_settings, format_layers, select_rule
    from melayer.util.console import err, plain, status
    from melayer.util.errors import MelayerError
    from melayer.util.io import check_prompt_size, write_json

    if not prompt.strip():
        raise MelayerError("empty prompt: --prompt must contain text")
    check_prompt_size(prompt, "--prompt")
    if max_new_tokens < 1:
        raise MelayerError("--max-new-tokens must be >= 1")
    check_mask_options(wemask, g.layers, g.me_layer)
    from melayer.interventions.methods import parse_method

    spec = parse_method(method) if method is not None else None
    if spec is not None and wemask is not None:
        raise MelayerError("give --wemask or --method, not both")
    if wemask is not None:  # cheap checks before loading the model
        check_settings(wemask, select=g.select, gamma=g.gamma)
    if output is not None:
        check_output_file(output)
    use_chat = chat_flag(g.chat)
    lm = g.load(g.adapter)
    _, used_chat = chat_prompt(lm, prompt, use_chat)
    mask: WeMask | None = adapter_mask(lm, g.adapter, g.use_adapter_mask, wemask)
    if mask is not None:
        err.print(f"[bold]adapter[/]: {g.adapter}, with its saved mask: {mask.describe()}", highlight=False)
        mask.apply()
    if wemask is not None:
        with status(None if g.layers or g.me_layer is not None else f"scanning {lm.name} for its ME layer ..."):
            mask = WeMask(lm, wemask, layers=g.layers, select=select_rule(g.select), gamma=g.gamma, me_layer=g.me_layer)
        err.print(f"[bold]wemask[/]: rate {mask.rate:g} -> k={mask.k} of {mask.hidden_size} dims, "
                  f"layers {format_layers(mask.layers)}"
                  + (f" (after ME layer {mask.me_layer}, {mask.me_layer_source})" if mask.me_layer is not None else "")
                  + f", select {mask.select}, gamma {mask.gamma:g}", highlight=False)
        if mask.is_noop:
            err.print(f"[yellow]note[/]: {mask.describe()}: generation is unchanged", highlight=False)
        mask.apply()
    bound = None
    if spec is not None:
        with status(f"calibrating {spec.label} on {lm.name} ..."):
            bound = spec.bind(lm)
        err.print(f"[bold]method[/]: {bound.describe()}", highlight=False)
    try:
        with bound if bound is not None else contextlib.nullcontext():
            texts, _, _ = greedy_generate(lm, [prompt], max_new_tokens=max_new_tokens, chat=use_chat)
    finally:
        if mask is not None:
            mask.remove()
    if output is not None:  # the text as generated, before anything is printed
        write_json(output, {
            "schema": "melayer.generate/1", "model": lm.name, "prompt": prompt, "chat_template": used_chat,
            "max_new_tokens": max_new_tokens, "decoding": "greedy", "dtype": g.dtype, "text": texts[0],
            "wemask": mask.to_dict() if mask is not None else None,
            "method": bound.to_dict() if bound is not None else None,
        })
    typer.echo(plain(texts[0]))  # a model's terminal escape sequences are shown, never executed by the terminal
    if output is not None:
        err.print(f"wrote {output}", highlight=False)
