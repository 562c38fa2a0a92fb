"""``melayer compare``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from melayer.cli import app
from melayer.cli.common import (
    ArchOpt,
    Chat,
    DeviceMapOpt,
    Dtype,
    DtypeOpt,
    MaxMemoryOpt,
    ModelOpt,
    ReportOpt,
    Select,
    check_output,
    finish,
    load_model,
)
from melayer.cli.eval_options import (
    BatchOpt,
    ChatOpt,
    FewshotOpt,
    GammaOpt,
    LayersOpt,
    LimitOpt,
    MaxNewOpt,
    MeLayerOpt,
    OverwriteOpt,
    SelectOpt,
    StrideOpt,
    SubjectsOpt,
    TaskOpt,
    WindowOpt,
    check_task,
)


@app.command("compare")
def compare_cmd(
    task: TaskOpt,
    rates: Annotated[Optional[str], typer.Option("--rates", help="comma-separated WeMask rates in [0, 1] (the short form of --method wemask:rate=R); 0 (unmodified) is always added [default: 0,0.005,0.01,0.05 without --method]")] = None,
    method: Annotated[Optional[list[str]], typer.Option("--method", "-M", help="an intervention, repeatable: NAME or NAME:key=value,... (wemask, wemask_before, wemask_random_dims, wemask_other_token, wemask_me_only, act, zerotuning, set_mean, set_zero)")] = None,
    model: ModelOpt = None,
    limit: LimitOpt = None,
    select: SelectOpt = Select.activation,
    layers: LayersOpt = None,
    me_layer: MeLayerOpt = None,
    gamma: GammaOpt = 1.0,
    batch_size: BatchOpt = 8,
    max_new_tokens: MaxNewOpt = None,
    chat: ChatOpt = Chat.auto,
    num_fewshot: FewshotOpt = None,
    window: WindowOpt = None,
    stride: StrideOpt = None,
    subjects: SubjectsOpt = None,
    sinks: Annotated[bool, typer.Option(help="measure the attention-sink rate at every rate")] = True,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="output directory (default out/compare/<task>)")] = None,
    overwrite: OverwriteOpt = False,
    dtype: DtypeOpt = Dtype.float32,
    arch: ArchOpt = None,
    adapter: Annotated[Optional[Path], typer.Option("--adapter", help="a melayer finetune output directory, merged into --model; --rates decide the mask (its saved mask is not added)")] = None,
    report: ReportOpt = False,
    device_map: DeviceMapOpt = None,
    max_memory: MaxMemoryOpt = None,
) -> None:
    """Same samples at several WeMask rates: paired differences vs rate 0, bootstrap CIs, McNemar, sinks
    -> DIR/compare.json + DIR/dose_response.png (+ one resumable eval per rate in DIR/rate_<r>/)."""
    from melayer.eval.compare import DEFAULT_RATES, parse_rates
    from melayer.interventions.wemask import check_settings, select_rule

    chat_mode, options = check_task(task, limit, batch_size, max_new_tokens, chat, num_fewshot=num_fewshot,
                                    window=window, stride=stride, subjects=subjects)
    from melayer.interventions.methods import parse_method

    specs = [parse_method(m) for m in method or []]  # validated before loading
    rate_list = parse_rates(rates if rates is not None else ("0" if specs else DEFAULT_RATES))
    check_settings(max(rate_list), select=select, gamma=gamma)  # validated before loading
    out = check_output(output or Path("out/compare") / task)
    from melayer.eval.compare import compare

    lm = load_model(model, dtype, arch, adapter, device_map, max_memory)
    result = compare(lm, task, rate_list, limit=limit, batch_size=batch_size, output=out, select=select_rule(select),
                     layers=layers, gamma=gamma, me_layer=me_layer, max_new_tokens=max_new_tokens, chat=chat_mode,
                     sinks=sinks, overwrite=overwrite, methods=specs, **options)
    finish(result.to_dict(), out, "compare", write=False, announce_plots=True, report=report)
