"""The settings of one fine-tuning run, validated once before anything is loaded or written."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from melayer.util.errors import MelayerError

METHODS = ("sft", "dpo", "grpo")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class FinetuneConfig:
    """Everything ``melayer finetune`` / :func:`melayer.finetuning.finetune` needs (JSON-serialisable).

    ``wemask`` is the WeMask rate (0: off); ``layers`` / ``me_layer`` / ``select`` / ``gamma`` as for
    :func:`melayer.wemask`. Without ``layers`` and ``me_layer`` the ME layer is found by a scan of training
    examples formatted exactly as the trainer sees them (chat template included).
    """

    method: str = "sft"
    model: str | None = None
    data: str = "gsm8k"  # "gsm8k" (vendored train split) or a JSONL file
    limit: int | None = None  # use the first N examples
    output: str = "out/finetune"
    # WeMask
    wemask: float = 0.0
    layers: str | None = None
    me_layer: int | None = None
    select: str = "activation"
    gamma: float = 1.0
    # adapter (LoRA by default) or full fine-tuning
    full: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    target: str = "all-linear"
    # optimisation
    epochs: float = 1.0
    max_steps: int = -1
    lr: float = 2e-4
    batch_size: int = 4
    grad_accum: int = 1
    max_length: int = 512
    seed: int = 0
    gradient_checkpointing: bool = True
    save_steps: int = 50
    logging_steps: int = 1
    resume: bool = False
    dtype: str = "float32"
    device_map: str | None = None  # as melayer.load's: a split across GPUs; offloaded weights are refused
    max_memory: str | None = None
    chat: bool | None = None  # None: use the chat template when the tokenizer has one
    # DPO
    beta: float = 0.1
    rejected_max_new_tokens: int = 256
    # GRPO
    num_generations: int = 4
    max_completion_length: int = 128
    temperature: float = 1.0

    def validate(self) -> FinetuneConfig:
        """Check every field; raise :class:`MelayerError` with one line naming the option at the first error."""
        if self.method not in METHODS:
            raise MelayerError(f"unknown fine-tuning method {self.method!r}; use one of {', '.join(METHODS)}")
        if not str(self.data).strip():
            raise MelayerError("--data must be 'gsm8k' or a JSONL file")
        if self.data != "gsm8k" and not Path(self.data).expanduser().is_file():
            raise MelayerError(f"--data {self.data}: no such file")
        _number("--wemask", self.wemask, 0.0, 1.0)
        _number("--gamma", self.gamma, 0.0, 1.0)
        _number("--lr", self.lr, 0.0, math.inf, open_low=True)
        _number("--epochs", self.epochs, 0.0, math.inf, open_low=True)
        _number("--lora-dropout", self.lora_dropout, 0.0, 1.0)
        _number("--beta", self.beta, 0.0, math.inf, open_low=True)
        _number("--temperature", self.temperature, 0.0, math.inf, open_low=True)
        for name, value, low in (("--lora-r", self.lora_r, 1), ("--lora-alpha", self.lora_alpha, 1),
                                 ("--batch-size", self.batch_size, 1), ("--grad-accum", self.grad_accum, 1),
                                 ("--max-length", self.max_length, 8), ("--save-steps", self.save_steps, 1),
                                 ("--logging-steps", self.logging_steps, 1),
                                 ("--rejected-max-new-tokens", self.rejected_max_new_tokens, 1),
                                 ("--num-generations", self.num_generations, 2),
                                 ("--max-completion-length", self.max_completion_length, 1)):
            _integer(name, value, low)
        _integer("--max-steps", self.max_steps, -1)
        if self.max_steps == 0:
            raise MelayerError("--max-steps must be >= 1 (or -1: run --epochs)")
        if self.limit is not None:
            _integer("--limit", self.limit, 1)
        if self.me_layer is not None:
            _integer("--me-layer", self.me_layer, 0)
        _integer("--seed", self.seed, 0)
        if self.select not in ("activation", "weight"):
            raise MelayerError(f"unknown --select {self.select!r}; use activation or weight")
        if self.dtype not in DTYPES:
            raise MelayerError(f"unknown --dtype {self.dtype!r}; use one of {', '.join(DTYPES)}")
        from melayer.models.devices import parse_device_map, parse_max_memory

        parse_device_map(self.device_map), parse_max_memory(self.max_memory)
        if not str(self.target).strip():
            raise MelayerError("--target must name modules (e.g. all-linear or q_proj,v_proj)")
        if self.method == "grpo" and self.batch_size % self.num_generations:
            raise MelayerError(f"grpo: --batch-size ({self.batch_size}) must be a multiple of --num-generations "
                               f"({self.num_generations}): each prompt's completions form one group")
        return self

    @property
    def output_dir(self) -> Path:
        return Path(self.output).expanduser()

    def to_dict(self) -> dict[str, Any]:
        return {"schema": "melayer.finetune_config/1", **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FinetuneConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def _number(name: str, value: Any, low: float, high: float, open_low: bool = False) -> None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise MelayerError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) and high != math.inf:
        raise MelayerError(f"{name} must be finite, got {value!r}")
    if v < low or v > high or (open_low and v == low) or math.isnan(v):
        where = f"in ({low:g}, {high:g}]" if open_low else f"in [{low:g}, {high:g}]"
        raise MelayerError(f"{name} must be {where.replace(', inf]', ', inf)')}, got {value!r}")


def _integer(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise MelayerError(f"{name} must be an integer, got {value!r}")
    if value < low:
        raise MelayerError(f"{name} must be >= {low}, got {value}")
