"""``melayer finetune sft|dpo|grpo``: fine-tuning on TRL + peft with WeMask on every training forward."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Optional

import typer

from melayer.cli import app
from melayer.cli.common import (
    Chat,
    ChatOpt,
    DeviceMapOpt,
    Dtype,
    DtypeOpt,
    GammaOpt,
    LayersOpt,
    MaxMemoryOpt,
    MeLayerOpt,
    ModelOpt,
    Select,
    SelectOpt,
    chat_flag,
    check_output,
)


class Method(StrEnum):
    """The fine-tuning methods (TRL trainers)."""

    sft = "sft"
    dpo = "dpo"
    grpo = "grpo"


@app.command()
def finetune(
    method: Annotated[Method, typer.Argument(help="sft (supervised), dpo (preference pairs) or grpo (rewarded generations)")],
    model: ModelOpt = None,
    data: Annotated[str, typer.Option("--data", help="'gsm8k' (vendored train split) or a JSONL file: prompt/completion (sft), prompt/chosen/rejected (dpo), prompt/answer (grpo), or question/answer")] = "gsm8k",
    limit: Annotated[Optional[int], typer.Option("--limit", "-n", help="use the first N examples")] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="output directory (adapter, wemask.json, train_log.jsonl, loss_curve.png, finetune.json, checkpoints/)")] = Path("out/finetune"),
    wemask: Annotated[float, typer.Option("--wemask", help="WeMask rate during training (0: off): mask k = int(RATE x hidden) dims")] = 0.0,
    layers: LayersOpt = None,
    me_layer: MeLayerOpt = None,
    select: SelectOpt = Select.activation,
    gamma: GammaOpt = 1.0,
    full: Annotated[bool, typer.Option("--full", help="full fine-tuning instead of a LoRA adapter")] = False,
    lora_r: Annotated[int, typer.Option("--lora-r", help="LoRA rank")] = 16,
    lora_alpha: Annotated[int, typer.Option("--lora-alpha", help="LoRA scaling: the update is scaled by alpha / r")] = 32,
    lora_dropout: Annotated[float, typer.Option("--lora-dropout", help="dropout on the LoRA input")] = 0.0,
    target: Annotated[str, typer.Option("--target", help="LoRA target modules: all-linear or a comma list")] = "all-linear",
    epochs: Annotated[float, typer.Option("--epochs", help="passes over the data (unless --max-steps)")] = 1.0,
    max_steps: Annotated[int, typer.Option("--max-steps", help="optimiser steps (-1: run --epochs)")] = -1,
    lr: Annotated[float, typer.Option("--lr", help="peak learning rate")] = 2e-4,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="examples per device per step")] = 4,
    grad_accum: Annotated[int, typer.Option("--grad-accum", help="gradient accumulation steps per optimiser step")] = 1,
    max_length: Annotated[int, typer.Option("--max-length", help="examples are cut to this many tokens")] = 512,
    seed: Annotated[int, typer.Option("--seed", help="seed of data order, LoRA init and sampling")] = 0,
    gradient_checkpointing: Annotated[bool, typer.Option("--gradient-checkpointing/--no-gradient-checkpointing", help="recompute activations in the backward pass (less memory, slower)")] = True,
    save_steps: Annotated[int, typer.Option("--save-steps", help="checkpoint every N steps (for --resume)")] = 50,
    resume: Annotated[bool, typer.Option("--resume", help="continue the interrupted run in --output")] = False,
    chat: ChatOpt = Chat.auto,
    beta: Annotated[float, typer.Option("--beta", help="dpo: KL weight")] = 0.1,
    rejected_max_new_tokens: Annotated[int, typer.Option("--rejected-max-new-tokens", help="dpo on gsm8k: length of the model's own (rejected) answers")] = 256,
    num_generations: Annotated[int, typer.Option("--num-generations", help="grpo: completions per prompt")] = 4,
    max_completion_length: Annotated[int, typer.Option("--max-completion-length", help="grpo: completion tokens")] = 128,
    dtype: DtypeOpt = Dtype.float32,
    device_map: DeviceMapOpt = None,
    max_memory: MaxMemoryOpt = None,
) -> None:
    """Fine-tune (LoRA by default) with WeMask on every training forward -> DIR/ adapter, wemask.json, finetune.json."""
    import warnings

    # transformers 5 renames gradient_checkpointing -> activation_checkpointing; melayer's settings use the new
    # name, but TRL 1.16 / peft 0.21 still call the model's old methods (is_gradient_checkpointing, ..._enable)
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*deprecated", category=FutureWarning)
    from melayer.finetuning import FinetuneConfig
    from melayer.finetuning import finetune as run
    from melayer.reporting.finetune import loss_curve, summary
    from melayer.util.console import err
    from melayer.util.io import read_jsonl

    cfg = FinetuneConfig(
        method=str(method), model=model, data=data, limit=limit, output=str(output), wemask=wemask, layers=layers,
        me_layer=me_layer, select=str(select), gamma=gamma, full=full, lora_r=lora_r, lora_alpha=lora_alpha,
        lora_dropout=lora_dropout, target=target, epochs=epochs, max_steps=max_steps, lr=lr, batch_size=batch_size,
        grad_accum=grad_accum, max_length=max_length, seed=seed, gradient_checkpointing=gradient_checkpointing,
        save_steps=save_steps, resume=resume, dtype=str(dtype), device_map=device_map, max_memory=max_memory,
        chat=chat_flag(chat),
        beta=beta, rejected_max_new_tokens=rejected_max_new_tokens, num_generations=num_generations,
        max_completion_length=max_completion_length).validate()
    check_output(output)
    result = run(cfg).to_dict()
    loss_curve(read_jsonl(output / "train_log.jsonl"), output / "loss_curve.png",
               title=f"{method} {result['model']} (WeMask {wemask:g})")
    for line in summary(result):
        err.print(line, highlight=False)
    err.print(f"wrote {output}", highlight=False)
