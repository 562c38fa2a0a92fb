"""``melayer eval``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from melayer.cli import app
from melayer.cli.common import adapter_mask, check_mask_options, check_output, finish, shared_options
from melayer.cli.eval_options import TaskGiven, TaskOpt, check_task
from melayer.util.errors import MelayerError


@app.command("eval")
@shared_options("task model limit wemask method select layers me_layer gamma batch_size max_new_tokens chat num_fewshot "
                "window stride subjects output overwrite dtype arch adapter use_adapter_mask report device_map "
                "max_memory", TaskGiven)
def eval_cmd(
    g: TaskGiven,
    task: TaskOpt,
    wemask: Annotated[Optional[float], typer.Option("--wemask", help="apply WeMask at this rate (fraction of hidden dims, 0-1)")] = None,
    method: Annotated[Optional[str], typer.Option("--method", "-M", help="an intervention instead of --wemask: NAME or NAME:key=value,... (calibrated on melayer's shipped prompts; see melayer compare --method)")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="output directory (default out/eval/<task>)")] = None,
) -> None:
    """Evaluate a model on one task -> DIR/eval.json + DIR/samples.jsonl (a killed run resumes)."""
    from melayer.interventions.wemask import check_settings

    chat_mode, options = check_task(task, g)
    check_mask_options(wemask, g.layers, g.me_layer)
    from melayer.interventions.methods import parse_method

    method_spec = parse_method(method) if method is not None else None
    if method_spec is not None and wemask is not None:
        raise MelayerError("give --wemask or --method, not both")
    if wemask is not None:
        check_settings(wemask, select=g.select, gamma=g.gamma)  # validated before loading
    out = check_output(output or Path("out/eval") / task)
    from melayer.analysis.me_layer import find_me_layer
    from melayer.eval import run
    from melayer.interventions.wemask import mask_width, parse_layers, select_rule
    from melayer.interventions.wemask import wemask as build_mask

    lm = g.load(g.adapter)
    mask = adapter_mask(lm, g.adapter, g.use_adapter_mask, wemask)
    me_layer = g.me_layer
    if wemask is not None:
        layer_list = parse_layers(g.layers, lm.num_layers)
        if me_layer is None and layer_list is None and mask_width(wemask, lm.hidden_size) > 0:
            me_layer = find_me_layer(lm, progress=True, hint="; pass --me-layer or --layers")
        mask = build_mask(lm, wemask, layers=layer_list, select=select_rule(g.select), gamma=g.gamma, me_layer=me_layer)
    if method_spec is not None:
        mask = method_spec.bind(lm)
    result = run(lm, task, limit=g.limit, batch_size=g.batch_size, output=out, max_new_tokens=g.max_new_tokens,
                 chat=chat_mode, intervention=mask, overwrite=g.overwrite, **options)
    finish(result.to_dict(), out, "eval", write=False, report=g.report)
