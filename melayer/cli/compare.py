"""``melayer compare``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from melayer.cli import app
from melayer.cli.common import check_output, finish, shared_options
from melayer.cli.eval_options import TaskGiven, TaskOpt, check_task


@app.command("compare")
@shared_options("task rates method model limit select layers me_layer gamma batch_size max_new_tokens chat num_fewshot "
                "window stride subjects sinks output overwrite dtype arch adapter report device_map max_memory", TaskGiven)
def compare_cmd(
    g: TaskGiven,
    task: TaskOpt,
    rates: Annotated[Optional[str], typer.Option("--rates", help="comma-separated WeMask rates in [0, 1] (the short form of --method wemask:rate=R); 0 (unmodified) is always added [default: 0,0.005,0.01,0.05 without --method]")] = None,
    method: Annotated[Optional[list[str]], typer.Option("--method", "-M", help="an intervention, repeatable: NAME or NAME:key=value,... (wemask, wemask_before, wemask_random_dims, wemask_other_token, wemask_me_only, act, zerotuning, set_mean, set_zero)")] = None,
    sinks: Annotated[bool, typer.Option(help="measure the attention-sink rate at every rate")] = True,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="output directory (default out/compare/<task>)")] = None,
    adapter: Annotated[Optional[Path], typer.Option("--adapter", help="a melayer finetune output directory, merged into --model; --rates decide the mask (its saved mask is not added)")] = None,
) -> None:
    """Same samples at several WeMask rates: paired differences vs rate 0, bootstrap CIs, McNemar, sinks
    -> DIR/compare.json + DIR/dose_response.png (+ one resumable eval per rate in DIR/rate_<r>/)."""
    from melayer.eval.compare import DEFAULT_RATES, parse_rates
    from melayer.interventions.wemask import check_settings, select_rule

    chat_mode, options = check_task(task, g)
    from melayer.interventions.methods import parse_method

    specs = [parse_method(m) for m in method or []]  # validated before loading
    rate_list = parse_rates(rates if rates is not None else ("0" if specs else DEFAULT_RATES))
    check_settings(max(rate_list), select=g.select, gamma=g.gamma)  # validated before loading
    out = check_output(output or Path("out/compare") / task)
    from melayer.eval.compare import compare

    lm = g.load(adapter)
    result = compare(lm, task, rate_list, limit=g.limit, batch_size=g.batch_size, output=out, select=select_rule(g.select),
                     layers=g.layers, gamma=g.gamma, me_layer=g.me_layer, max_new_tokens=g.max_new_tokens, chat=chat_mode,
                     sinks=sinks, overwrite=g.overwrite, methods=specs, **options)
    finish(result.to_dict(), out, "compare", write=False, announce_plots=True, report=g.report)
