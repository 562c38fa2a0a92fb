"""``melayer eval``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from melayer.cli import app
from melayer.cli.common import (
    AdapterMaskOpt,
    AdapterOpt,
    ArchOpt,
    Chat,
    DeviceMapOpt,
    Dtype,
    DtypeOpt,
    MaxMemoryOpt,
    ModelOpt,
    ReportOpt,
    Select,
    adapter_mask,
    check_mask_options,
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
from melayer.util.errors import MelayerError


@app.command("eval")
def eval_cmd(
    task: TaskOpt,
    model: ModelOpt = None,
    limit: LimitOpt = None,
    wemask: Annotated[Optional[float], typer.Option("--wemask", help="apply WeMask at this rate (fraction of hidden dims, 0-1)")] = None,
    method: Annotated[Optional[str], typer.Option("--method", "-M", help="an intervention instead of --wemask: NAME or NAME:key=value,... (calibrated on melayer's shipped prompts; see melayer compare --method)")] = None,
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
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="output directory (default out/eval/<task>)")] = None,
    overwrite: OverwriteOpt = False,
    dtype: DtypeOpt = Dtype.float32,
    arch: ArchOpt = None,
    adapter: AdapterOpt = None,
    use_adapter_mask: AdapterMaskOpt = True,
    report: ReportOpt = False,
    device_map: DeviceMapOpt = None,
    max_memory: MaxMemoryOpt = None,
) -> None:
    """Evaluate a model on one task -> DIR/eval.json + DIR/samples.jsonl (a killed run resumes)."""
    from melayer.interventions.wemask import check_settings

    chat_mode, options = check_task(task, limit, batch_size, max_new_tokens, chat, num_fewshot=num_fewshot,
                                    window=window, stride=stride, subjects=subjects)
    check_mask_options(wemask, layers, me_layer)
    from melayer.interventions.methods import parse_method

    method_spec = parse_method(method) if method is not None else None
    if method_spec is not None and wemask is not None:
        raise MelayerError("give --wemask or --method, not both")
    if wemask is not None:
        check_settings(wemask, select=select, gamma=gamma)  # validated before loading
    out = check_output(output or Path("out/eval") / task)
    from melayer.analysis.me_layer import find_me_layer
    from melayer.eval import run
    from melayer.interventions.wemask import mask_width, parse_layers, select_rule
    from melayer.interventions.wemask import wemask as build_mask

    lm = load_model(model, dtype, arch, adapter, device_map, max_memory)
    mask = adapter_mask(lm, adapter, use_adapter_mask, wemask)
    if wemask is not None:
        layer_list = parse_layers(layers, lm.num_layers)
        if me_layer is None and layer_list is None and mask_width(wemask, lm.hidden_size) > 0:
            me_layer = find_me_layer(lm, progress=True, hint="; pass --me-layer or --layers")
        mask = build_mask(lm, wemask, layers=layer_list, select=select_rule(select), gamma=gamma, me_layer=me_layer)
    if method_spec is not None:
        mask = method_spec.bind(lm)
    result = run(lm, task, limit=limit, batch_size=batch_size, output=out, max_new_tokens=max_new_tokens,
                 chat=chat_mode, intervention=mask, overwrite=overwrite, **options)
    finish(result.to_dict(), out, "eval", write=False, report=report)
