"""``melayer eval`` and ``melayer compare``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from melayer.cli import app
from melayer.cli.common import ArchOpt, DtypeOpt, ModelOpt
from melayer.util.errors import MelayerError

TaskOpt = Annotated[str, typer.Option("--task", "-t", help="ppl, gsm8k, math500, ifeval, arc_easy, arc_challenge, hellaswag, lambada, winogrande")]
LimitOpt = Annotated[Optional[int], typer.Option("--limit", "-n", help="evaluate only the first N samples")]
BatchOpt = Annotated[int, typer.Option("--batch-size", "-b", help="samples per model call")]
MaxNewOpt = Annotated[Optional[int], typer.Option("--max-new-tokens", help="generation budget (gsm8k 256, math500 512, ifeval 512 by default)")]
SelectOpt = Annotated[str, typer.Option("--select", help="WeMask dim selection: activation (|attention input|, the released code) or weight (|pre-attention norm gain|)")]
LayersOpt = Annotated[Optional[str], typer.Option("--layers", help="WeMask layers, e.g. 4-17 or 4,5,6 (default: every layer after the ME layer)")]
MeLayerOpt = Annotated[Optional[int], typer.Option("--me-layer", help="ME layer (default: found with one scan)")]
GammaOpt = Annotated[float, typer.Option("--gamma", help="WeMask strength: masked dims are scaled by 1 - gamma")]
ChatOpt = Annotated[str, typer.Option("--chat", help="auto (chat template for generation tasks when the tokenizer has one), on or off")]
FewshotOpt = Annotated[Optional[int], typer.Option("--num-fewshot", help="gsm8k only: k exemplars (0-8) from the first train problems")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="discard existing results in --output instead of resuming")]


def _check(task: str, limit: int | None, batch_size: int, max_new_tokens: int | None, chat: str,
           num_fewshot: int | None) -> tuple[bool | str, dict]:
    """Validate everything cheap before loading a model (bad input -> one line, nothing written)."""
    from melayer.eval.runner import check_run_args
    from melayer.eval.tasks import TASKS, get_task

    if task not in TASKS:
        raise MelayerError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    check_run_args(limit, batch_size, max_new_tokens)
    modes: dict[str, bool | str] = {"auto": "auto", "on": True, "off": False}
    if chat not in modes:
        raise MelayerError(f"--chat must be auto, on or off (got {chat!r})")
    options = {"num_fewshot": num_fewshot} if num_fewshot is not None else {}
    get_task(task, **options)  # validates the options
    return modes[chat], options


def _check_wemask(select: str, gamma: float) -> None:
    from melayer.interventions.wemask import SELECT_RULES

    if select not in SELECT_RULES:
        raise MelayerError(f"unknown --select {select!r}; use one of {', '.join(SELECT_RULES)}")
    if not 0.0 <= gamma <= 1.0:
        raise MelayerError(f"--gamma must be in [0, 1] (got {gamma:g})")


@app.command("eval")
def eval_cmd(
    task: TaskOpt,
    model: ModelOpt = None,
    limit: LimitOpt = None,
    wemask: Annotated[Optional[float], typer.Option("--wemask", help="apply WeMask at this rate (fraction of hidden dims, 0-1)")] = None,
    select: SelectOpt = "activation",
    layers: LayersOpt = None,
    me_layer: MeLayerOpt = None,
    gamma: GammaOpt = 1.0,
    batch_size: BatchOpt = 8,
    max_new_tokens: MaxNewOpt = None,
    chat: ChatOpt = "auto",
    num_fewshot: FewshotOpt = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="output directory (default out/eval/<task>)")] = None,
    overwrite: OverwriteOpt = False,
    dtype: DtypeOpt = "float32",
    arch: ArchOpt = None,
) -> None:
    """Evaluate a model on one task -> DIR/eval.json + DIR/samples.jsonl (a killed run resumes)."""
    chat_mode, options = _check(task, limit, batch_size, max_new_tokens, chat, num_fewshot)
    if wemask is not None:
        _check_wemask(select, gamma)
        if not 0.0 <= wemask <= 1.0:
            raise MelayerError(f"--wemask rate {wemask:g} is out of range: it is a fraction of the hidden size in [0, 1]")
    import melayer
    from melayer.eval import run
    from melayer.report.eval import print_eval

    out = output or Path("out/eval") / task
    lm = melayer.load(model, dtype=dtype, arch=arch)
    intervention = None
    if wemask is not None:
        from melayer.interventions.wemask import parse_layers
        from melayer.interventions.wemask import wemask as make

        layer_list = parse_layers(layers, lm.num_layers)
        if me_layer is None and layer_list is None and int(wemask * lm.hidden_size) > 0:
            found = melayer.scan(lm).me_layer
            if found is None:
                raise MelayerError(f"no ME layer found in {lm.name}; pass --me-layer or --layers")
            me_layer = int(found)
        make(lm, wemask, layers=layer_list, select=select, gamma=gamma, me_layer=me_layer)  # validate now

        def intervention():
            return make(lm, wemask, layers=layer_list, select=select, gamma=gamma, me_layer=me_layer)

    result = run(lm, task, limit=limit, batch_size=batch_size, output=out, max_new_tokens=max_new_tokens,
                 chat=chat_mode, intervention=intervention, overwrite=overwrite, **options)
    print_eval(result.to_dict())
    typer.echo(f"wrote {out / 'eval.json'}")


@app.command("compare")
def compare_cmd(
    task: TaskOpt,
    rates: Annotated[str, typer.Option("--rates", help="comma-separated WeMask rates in [0, 1]; 0 (baseline) is always added")] = "0,0.001,0.01,0.05",
    model: ModelOpt = None,
    limit: LimitOpt = None,
    select: SelectOpt = "activation",
    layers: LayersOpt = None,
    me_layer: MeLayerOpt = None,
    gamma: GammaOpt = 1.0,
    batch_size: BatchOpt = 8,
    max_new_tokens: MaxNewOpt = None,
    chat: ChatOpt = "auto",
    num_fewshot: FewshotOpt = None,
    sinks: Annotated[bool, typer.Option(help="measure the attention-sink rate at every rate")] = True,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="output directory (default out/compare/<task>)")] = None,
    overwrite: OverwriteOpt = False,
    dtype: DtypeOpt = "float32",
    arch: ArchOpt = None,
) -> None:
    """Same samples at several WeMask rates: paired differences vs rate 0, bootstrap CIs, McNemar, sinks
    -> DIR/compare.json + DIR/dose_response.png (+ one resumable eval per rate in DIR/rate_<r>/)."""
    from melayer.eval.compare import parse_rates

    chat_mode, options = _check(task, limit, batch_size, max_new_tokens, chat, num_fewshot)
    rate_list = parse_rates(rates)
    _check_wemask(select, gamma)
    import melayer
    from melayer.eval.compare import compare
    from melayer.report.eval import dose_response_plot, print_compare

    out = output or Path("out/compare") / task
    lm = melayer.load(model, dtype=dtype, arch=arch)
    result = compare(lm, task, rate_list, limit=limit, batch_size=batch_size, output=out, select=select,
                     layers=layers, gamma=gamma, me_layer=me_layer, max_new_tokens=max_new_tokens, chat=chat_mode,
                     sinks=sinks, overwrite=overwrite, **options)
    print_compare(result.to_dict())
    dose_response_plot(result.to_dict(), out / "dose_response.png")
    typer.echo(f"wrote {out / 'compare.json'} and {out / 'dose_response.png'}")
