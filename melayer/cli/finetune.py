"""``melayer finetune sft|dpo|grpo``: fine-tuning on TRL + peft with WeMask on every training forward."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional, cast

import typer

from melayer.cli import app, common

if TYPE_CHECKING:
    from melayer.finetuning.config import FinetuneMethod


class Method(StrEnum):
    """The fine-tuning methods (TRL trainers)."""

    sft = "sft"
    dpo = "dpo"
    grpo = "grpo"


@app.command()
def finetune(
    method: Annotated[Method, typer.Argument(help="sft (supervised), dpo (preference pairs) or grpo (rewarded generations)")],
    model: common.ModelOpt = None,
    data: Annotated[str, typer.Option("--data", help="'gsm8k' (vendored train split) or a JSONL file: prompt/completion (sft), prompt/chosen/rejected (dpo), prompt/answer (grpo), or question/answer")] = "gsm8k",
    limit: Annotated[Optional[int], typer.Option("--limit", "-n", help="use the first N examples")] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="output directory (adapter, wemask.json, train_log.jsonl, loss_curve.png, finetune.json, checkpoints/)")] = Path("out/finetune"),
    wemask: Annotated[float, typer.Option("--wemask", help="WeMask rate during training (0: off): mask k = int(RATE x hidden) dims")] = 0.0,
    intervention: Annotated[Optional[str], typer.Option("--method", "-M", help="instead of --wemask: a trainable method of the registry on every training forward, NAME or NAME:key=value,... (wemask, wemask_before, wemask_random_dims, wemask_other_token, wemask_me_only; see melayer ls methods)")] = None,
    layers: common.LayersOpt = None,
    me_layer: common.MeLayerOpt = None,
    select: common.SelectOpt = common.Select.activation,
    gamma: common.GammaOpt = 1.0,
    full: Annotated[bool, typer.Option("--full", help="full fine-tuning instead of a LoRA adapter")] = False,
    lora_r: Annotated[int, typer.Option("--lora-r", help="LoRA rank")] = 16,
    lora_alpha: Annotated[int, typer.Option("--lora-alpha", help="LoRA scaling: the update is scaled by alpha / r")] = 32,
    lora_dropout: Annotated[float, typer.Option("--lora-dropout", help="dropout on the LoRA input")] = 0.0,
    lora_target_modules: Annotated[str, typer.Option("--lora-target-modules", help="LoRA target modules: all-linear or a comma list")] = "all-linear",
    num_train_epochs: Annotated[float, typer.Option("--num-train-epochs", help="passes over the data (unless --max-steps)")] = 1.0,
    max_steps: Annotated[int, typer.Option("--max-steps", help="optimiser steps (-1: run --num-train-epochs)")] = -1,
    learning_rate: Annotated[float, typer.Option("--learning-rate", help="peak learning rate")] = 2e-4,
    per_device_train_batch_size: Annotated[int, typer.Option("--per-device-train-batch-size", help="examples per device per step")] = 4,
    gradient_accumulation_steps: Annotated[int, typer.Option("--gradient-accumulation-steps", help="gradient accumulation steps per optimiser step")] = 1,
    max_length: Annotated[int, typer.Option("--max-length", help="examples are cut to this many tokens")] = 512,
    seed: Annotated[int, typer.Option("--seed", help="seed of data order, LoRA init and sampling")] = 0,
    gradient_checkpointing: Annotated[bool, typer.Option("--gradient-checkpointing/--no-gradient-checkpointing", help="recompute activations in the backward pass (less memory, slower)")] = True,
    save_steps: Annotated[int, typer.Option("--save-steps", help="checkpoint every N steps (for --resume)")] = 50,
    logging_steps: Annotated[int, typer.Option("--logging-steps", help="log the loss every N steps (train_log.jsonl)")] = 1,
    resume: Annotated[bool, typer.Option("--resume", help="continue the interrupted run in --output")] = False,
    chat: common.ChatOpt = common.Chat.auto,
    beta: Annotated[float, typer.Option("--beta", help="dpo: KL weight")] = 0.1,
    rejected_max_new_tokens: Annotated[int, typer.Option("--rejected-max-new-tokens", help="dpo on gsm8k: length of the model's own (rejected) answers")] = 256,
    num_generations: Annotated[int, typer.Option("--num-generations", help="grpo: completions per prompt")] = 4,
    max_completion_length: Annotated[int, typer.Option("--max-completion-length", help="grpo: completion tokens")] = 128,
    temperature: Annotated[float, typer.Option("--temperature", help="grpo: sampling temperature of the rollouts")] = 1.0,
    dtype: common.DtypeOpt = common.Dtype.float32,
    device_map: common.DeviceMapOpt = None,
    max_memory: common.MaxMemoryOpt = None,
    trl: Annotated[Optional[list[str]], typer.Option("--trl", metavar="KEY=VALUE", help="any other option of TRL's SFTConfig / DPOConfig / GRPOConfig, e.g. --trl warmup_steps=10 --trl weight_decay=0.01 (repeatable)")] = None,
) -> None:
    """Fine-tune (LoRA by default) with WeMask on every training forward -> DIR/ adapter, wemask.json, finetune.json."""
    import warnings

    # transformers 5 renames gradient_checkpointing -> activation_checkpointing; melayer's settings use the new
    # name, but TRL 1.16 / peft 0.21 still call the model's old methods (is_gradient_checkpointing, ..._enable)
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*deprecated", category=FutureWarning)
    from melayer.finetuning import FinetuneConfig
    from melayer.finetuning import finetune as run
    from melayer.finetuning.config import parse_trl_options
    from melayer.interventions.wemask import select_rule
    from melayer.reporting.finetune import loss_curve, summary
    from melayer.util.console import err
    from melayer.util.io import read_jsonl

    cfg = FinetuneConfig(
        method=cast("FinetuneMethod", str(method)), model=model, data=data, limit=limit, output=str(output), wemask=wemask, intervention=intervention,
        layers=layers,
        me_layer=me_layer, select=select_rule(str(select)), gamma=gamma, full=full, lora_r=lora_r, lora_alpha=lora_alpha,
        lora_dropout=lora_dropout, lora_target_modules=lora_target_modules, num_train_epochs=num_train_epochs,
        max_steps=max_steps, learning_rate=learning_rate, per_device_train_batch_size=per_device_train_batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps, max_length=max_length, seed=seed,
        gradient_checkpointing=gradient_checkpointing, save_steps=save_steps, logging_steps=logging_steps, resume=resume, dtype=common.dtype_name(dtype),
        device_map=device_map, max_memory=max_memory, chat=common.chat_flag(chat), beta=beta,
        rejected_max_new_tokens=rejected_max_new_tokens, num_generations=num_generations,
        max_completion_length=max_completion_length, temperature=temperature, trl_args=parse_trl_options(trl)).validate()
    common.check_output(output)
    result = run(cfg).to_dict()
    loss_curve(read_jsonl(output / "train_log.jsonl"), output / "loss_curve.png",
               title=f"{method} {result['model']} ({intervention or f'WeMask {wemask:g}'})")
    for line in summary(result):
        err.print(line, highlight=False)
    err.print(f"wrote {output}", highlight=False)
