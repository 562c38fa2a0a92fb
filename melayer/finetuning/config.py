"""The settings of one fine-tuning run, validated once before anything is loaded or written."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from difflib import get_close_matches
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from melayer.util.errors import MelayerError

if TYPE_CHECKING:
    from melayer.interventions.wemask import SelectRule
    from melayer.models.loading import DType

FinetuneMethod = Literal["sft", "dpo", "grpo"]  # supervised, preference pairs, rewarded generations (TRL trainers)
METHODS: tuple[FinetuneMethod, ...] = get_args(FinetuneMethod)
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class FinetuneConfig:
    """Everything ``melayer finetune`` / :func:`melayer.finetuning.finetune` needs (JSON-serialisable).

    ``wemask`` is the WeMask rate (0: off); ``layers`` / ``me_layer`` / ``select`` / ``gamma`` as for
    :func:`melayer.wemask`. Without ``layers`` and ``me_layer`` the ME layer is found by a scan of training
    examples formatted exactly as the trainer sees them (chat template included).

    ``intervention`` is instead any trainable method of the registry (``melayer ls methods``), as ``compare
    --method`` spells it: ``"wemask:rate=0.01"``, or a control (``"wemask_before:rate=0.01"``,
    ``wemask_random_dims``, ``wemask_other_token``, ``wemask_me_only``); what it calibrates comes from the same
    training-format examples, and ``me_layer`` overrides the scanned ME layer. ``--wemask R`` is the short form of
    ``"wemask:rate=R"`` (on the command line: ``--method SPEC``).

    Attributes:
        method: ``"sft"`` (supervised), ``"dpo"`` (preference pairs) or ``"grpo"`` (rewarded generations).
        model: a model name, HF directory, ``.gguf`` file or hub id (None: the default model).
        data: ``"gsm8k"`` (the vendored train split) or a JSONL file: prompt/completion (sft),
            prompt/chosen/rejected (dpo), prompt/answer (grpo), or question/answer.
        limit: use only the first N examples (None: all).
        output: output directory (adapter, wemask.json, train_log.jsonl, loss_curve.png, finetune.json,
            checkpoints/).
        wemask: WeMask rate during training (0: off): k = int(rate x hidden) dims are masked.
        layers: WeMask layers, e.g. ``"4-17"`` or ``"4,5,6"`` (None: every layer after the ME layer).
        me_layer: the ME layer (None: found with one scan of training examples).
        select: WeMask dims by ``"activation"`` (|value| of the massive token's attention input) or ``"weight"``
            (|pre-attention norm gain|).
        gamma: WeMask strength: masked dims are scaled by 1 - gamma (1 = zeroed).
        intervention: instead of ``wemask``, a trainable method of the interventions registry, e.g.
            ``"wemask_before:rate=0.01"`` (None: off; see above).
        full: full fine-tuning instead of a LoRA adapter.
        lora_r: LoRA rank.
        lora_alpha: LoRA scaling: the update is scaled by alpha / r.
        lora_dropout: dropout on the LoRA input.
        lora_target_modules: LoRA target modules: ``"all-linear"`` or a comma-separated list.
        num_train_epochs: passes over the data (unless ``max_steps`` is set).
        max_steps: optimiser steps (-1: run ``num_train_epochs``).
        learning_rate: peak learning rate.
        per_device_train_batch_size: examples per device per step.
        gradient_accumulation_steps: gradient accumulation steps per optimiser step.
        max_length: examples are cut to this many tokens.
        seed: seed of the data order, the LoRA initialisation and sampling.
        gradient_checkpointing: recompute activations in the backward pass (less memory, slower).
        save_steps: write a checkpoint every N steps (for ``resume``).
        logging_steps: log the loss every N steps (train_log.jsonl).
        resume: continue the interrupted run in ``output``.
        dtype: precision of the weights and activations (``"float32"``, ``"bfloat16"``, ``"float16"``).
        device_map: split the model across devices with accelerate (as :func:`melayer.load`'s; offloaded weights
            are refused).
        max_memory: memory per device for the device map, e.g. ``"0=20GiB,1=20GiB,cpu=64GiB"``.
        chat: use the chat template (None: when the tokenizer has one).
        beta: dpo: the KL weight.
        rejected_max_new_tokens: dpo on gsm8k: length of the model's own (rejected) answers.
        num_generations: grpo: completions per prompt.
        max_completion_length: grpo: completion tokens.
        temperature: grpo: sampling temperature of the rollouts.
        trl_args: any other option of the method's TRL config (SFTConfig / DPOConfig / GRPOConfig), passed
            through as given, e.g. ``{"warmup_steps": 10}``.
    """

    method: FinetuneMethod = "sft"
    model: str | None = None
    data: str = "gsm8k"  # "gsm8k" (vendored train split) or a JSONL file
    limit: int | None = None  # use the first N examples
    output: str = "out/finetune"
    # WeMask
    wemask: float = 0.0
    layers: str | None = None
    me_layer: int | None = None
    select: SelectRule = "activation"
    gamma: float = 1.0
    intervention: str | None = None  # a registry spec, e.g. "wemask_before:rate=0.01" (instead of wemask)
    # adapter (LoRA by default) or full fine-tuning
    full: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: str = "all-linear"
    # optimisation (TRL's names)
    num_train_epochs: float = 1.0
    max_steps: int = -1
    learning_rate: float = 2e-4
    per_device_train_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_length: int = 512
    seed: int = 0
    gradient_checkpointing: bool = True
    save_steps: int = 50
    logging_steps: int = 1
    resume: bool = False
    dtype: DType = "float32"
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
    # any other option of the method's TRL config (SFTConfig / DPOConfig / GRPOConfig), passed through
    trl_args: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> FinetuneConfig:
        """Check every field.

        Returns:
            The config itself, so that ``FinetuneConfig(...).validate()`` can be passed on.

        Raises:
            MelayerError: one line naming the option at the first error.
        """
        if self.method not in METHODS:
            raise MelayerError(f"unknown fine-tuning method {self.method!r}; use one of {', '.join(METHODS)}")
        if not str(self.data).strip():
            raise MelayerError("--data must be 'gsm8k' or a JSONL file")
        if self.data != "gsm8k" and not Path(self.data).expanduser().is_file():
            raise MelayerError(f"--data {self.data}: no such file")
        _number("--wemask", self.wemask, 0.0, 1.0)
        if self.intervention is not None:
            self.check_intervention()
        _number("--gamma", self.gamma, 0.0, 1.0)
        _number("--learning-rate", self.learning_rate, 0.0, math.inf, open_low=True)
        _number("--num-train-epochs", self.num_train_epochs, 0.0, math.inf, open_low=True)
        _number("--lora-dropout", self.lora_dropout, 0.0, 1.0)
        _number("--beta", self.beta, 0.0, math.inf, open_low=True)
        _number("--temperature", self.temperature, 0.0, math.inf, open_low=True)
        for name, value, low in (("--lora-r", self.lora_r, 1), ("--lora-alpha", self.lora_alpha, 1),
                                 ("--per-device-train-batch-size", self.per_device_train_batch_size, 1),
                                 ("--gradient-accumulation-steps", self.gradient_accumulation_steps, 1),
                                 ("--max-length", self.max_length, 8), ("--save-steps", self.save_steps, 1),
                                 ("--logging-steps", self.logging_steps, 1),
                                 ("--rejected-max-new-tokens", self.rejected_max_new_tokens, 1),
                                 ("--num-generations", self.num_generations, 2),
                                 ("--max-completion-length", self.max_completion_length, 1)):
            _integer(name, value, low)
        _integer("--max-steps", self.max_steps, -1)
        if self.max_steps == 0:
            raise MelayerError("--max-steps must be >= 1 (or -1: run --num-train-epochs)")
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
        if not str(self.lora_target_modules).strip():
            raise MelayerError("--lora-target-modules must name modules (e.g. all-linear or q_proj,v_proj)")
        if self.method == "grpo" and self.per_device_train_batch_size % self.num_generations:
            raise MelayerError(f"grpo: --per-device-train-batch-size ({self.per_device_train_batch_size}) must be a "
                               f"multiple of --num-generations ({self.num_generations}): each prompt's completions "
                               "form one group")
        self.trl_args = check_trl_args(self.method, self.trl_args)
        return self

    def check_intervention(self) -> None:
        """Refuse a method that makes no sense in training, and WeMask's own options given beside it."""
        from melayer.interventions.methods import training_spec

        if not isinstance(self.intervention, str) or not self.intervention.strip():
            raise MelayerError("--method (intervention=) must name a method, e.g. wemask_before:rate=0.01")
        training_spec(self.intervention)
        if self.wemask:
            raise MelayerError(f"give --wemask or --method (intervention=), not both (--wemask {self.wemask:g} is "
                               f"--method wemask:rate={self.wemask:g})")
        for name, value, default in (("--layers", self.layers, None), ("--select", self.select, "activation"),
                                     ("--gamma", self.gamma, 1.0)):
            if value != default:
                raise MelayerError(f"{name} is a --wemask option; with --method (intervention=) give it in the spec "
                                   f"({self.intervention.split(':')[0]}:{name[2:]}=...)")

    @property
    def output_dir(self) -> Path:
        return Path(self.output).expanduser()

    def to_dict(self) -> dict[str, Any]:
        """The config as ``finetune_config.json`` holds it.

        Returns:
            Every field by name, with ``"schema": "melayer.finetune_config/2"``.
        """
        return {"schema": "melayer.finetune_config/2", **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FinetuneConfig:
        """The config a ``finetune_config.json`` holds (files written before TRL's names were used read too).

        Args:
            data: a loaded ``finetune_config.json``; unknown keys are ignored.

        Returns:
            The config.
        """
        names = {f.name for f in fields(cls)}
        data = {_FORMER.get(k, k): v for k, v in data.items()}
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def from_options(cls, **options: Any) -> FinetuneConfig:
        """``FinetuneConfig(**options)``, with one line naming an unknown option (and the likely one).

        Args:
            **options: fields by name (TRL's names; a former name is refused with the new one suggested).

        Returns:
            The config (not yet validated: see :meth:`validate`).

        Raises:
            MelayerError: an unknown option.
        """
        names = {f.name for f in fields(cls)}
        for key in options:
            if key not in names:
                close = _FORMER.get(key) or next(iter(get_close_matches(key, sorted(names), n=1)), None)
                hint = f"; did you mean {close}?" if close else ""
                raise MelayerError(f"unknown fine-tuning option {key!r}{hint}")
        return cls(**options)


# earlier field names (read back from older finetune_config.json files; suggested for an unknown option)
_FORMER = {"lr": "learning_rate", "batch_size": "per_device_train_batch_size",
           "grad_accum": "gradient_accumulation_steps", "epochs": "num_train_epochs", "target": "lora_target_modules"}


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


# --------------------------------------------------------------------------------------------------
# TRL pass-through: options melayer does not name itself go to the method's TRL config as they are

# TRL options melayer sets from its own settings (an option of the same name, or the output directory)
_OWN_TRL = {"output_dir": "--output", **{f"{name}{tail}": "--gradient-checkpointing"
                                         for name in ("gradient_checkpointing", "activation_checkpointing")
                                         for tail in ("", "_kwargs")}}


def trl_config_class(method: str) -> Any:
    """TRL's config class for ``method`` (``SFTConfig``, ``DPOConfig`` or ``GRPOConfig``)."""
    import trl

    return {"sft": trl.SFTConfig, "dpo": trl.DPOConfig, "grpo": trl.GRPOConfig}[method]


def parse_trl_options(items: list[str] | None) -> dict[str, str]:
    """``["key=value", ...]`` (the CLI's repeated ``--trl``) -> ``{key: value}``; values stay text until
    :func:`check_trl_args` reads them by the TRL field's type."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise MelayerError(f"--trl {item!r}: give KEY=VALUE (a field of TRL's config, e.g. warmup_steps=10)")
        out[key.strip()] = value.strip()
    return out


def check_trl_args(method: str, args: dict[str, Any]) -> dict[str, Any]:
    """Check ``args`` against the fields of the method's TRL config and convert text values to each field's type
    (``"10"`` -> 10 for an ``int``, ``"true"`` -> True, ``"null"`` -> None where allowed, JSON for a dict or
    list). Raise :class:`MelayerError` with one line at the first unknown key or bad value."""
    if not args:
        return {}
    if not isinstance(args, dict):
        raise MelayerError(f"trl_args must be a mapping of TRL option -> value, got {type(args).__name__}")
    import typing

    cls = trl_config_class(method)
    known = {f.name for f in fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    own = {f.name for f in fields(FinetuneConfig)}
    out: dict[str, Any] = {}
    for key, value in args.items():
        name = f"--trl {key}"
        if key not in known:
            close = get_close_matches(str(key), sorted(known), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise MelayerError(f"{name}: not an option of TRL's {cls.__name__}{hint}")
        if key in own or key in _OWN_TRL:
            option = _OWN_TRL.get(key) or "--" + key.replace("_", "-")
            raise MelayerError(f"{name}: melayer sets this one from its own option; use {option}")
        out[key] = _typed(name, value, hints[key])
    return out


def _typed(name: str, value: Any, hint: Any) -> Any:
    """``value`` as a value of the type ``hint`` (text is converted; other values must already fit)."""
    import enum
    import json
    import types
    import typing

    origin = typing.get_origin(hint)
    options = typing.get_args(hint) if origin in (typing.Union, types.UnionType) else (hint,)
    kinds = [typing.get_origin(o) or o for o in options]
    if typing.Literal in kinds:  # e.g. str | None | Literal[False]: the literal's values, as types
        kinds = [k for k in kinds if k is not typing.Literal] + [
            type(v) for o in options if typing.get_origin(o) is typing.Literal for v in typing.get_args(o)]
    text = value.strip() if isinstance(value, str) else None
    want = " or ".join(sorted({"null" if k is type(None) else getattr(k, "__name__", str(k)) for k in kinds}))
    if text is None:
        fits = (value is None and type(None) in kinds) or any(
            isinstance(value, k) and not (isinstance(value, bool) and k in (int, float))
            for k in kinds if isinstance(k, type) and k is not type(None)) or (
            float in kinds and isinstance(value, int) and not isinstance(value, bool))
        if not fits:
            raise MelayerError(f"{name} must be {want}, got {value!r}")
        return value
    low = text.lower()
    if type(None) in kinds and (low == "null" or (low == "none" and str not in kinds)):
        return None  # "none" is text where text is allowed (report_to=none)
    if bool in kinds and low in ("true", "false", "yes", "no", "1", "0", "on", "off"):
        return low in ("true", "yes", "1", "on")
    if int in kinds:
        try:
            return int(text)
        except ValueError:
            pass
    if float in kinds:
        try:
            number = float(text)
        except ValueError:
            pass
        else:
            if not math.isnan(number):
                return number
    if dict in kinds or list in kinds:
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError:
            parsed = None
        if isinstance(parsed, (dict, list)) and type(parsed) in kinds:
            return parsed
    if str in kinds or any(isinstance(k, type) and issubclass(k, enum.Enum) for k in kinds):
        return text
    raise MelayerError(f"{name} must be {want}, got {value!r}")
