"""``melayer.finetune``: SFT / DPO / GRPO on TRL + peft with WeMask on every training forward.

WeMask's hooks are installed on the model before TRL builds its trainer and stay on for the whole run: every
training forward (and, for DPO, the reference forward, which is the same model with its adapters disabled;
for GRPO, the prefill of each rollout) is masked. The ME layer and massive token are found on training
examples formatted exactly as the trainer sees them (chat template included), unless given.

Output directory: the adapter (peft; the whole model with ``full=True``), ``wemask.json`` (exact settings),
``train_log.jsonl`` (one record per logging step), ``finetune.json`` (schema ``melayer.finetune/1``: config,
data hashes, ME layer, massive token, final loss, speed) and ``checkpoints/`` (for ``resume``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from melayer.finetuning.config import FinetuneConfig, FinetuneMethod
from melayer.finetuning.data import (
    load_records,
    plain_rows,
    trainer_rows,
    training_texts,
    use_chat,
)
from melayer.interventions.wemask import WeMask
from melayer.models.loading import LM, load
from melayer.util.errors import MelayerError
from melayer.util.results import Result

SCHEMA = "melayer.finetune/1"
RESULT_FILE = "finetune.json"
LOG_FILE = "train_log.jsonl"
WEMASK_FILE = "wemask.json"


@dataclass
class FinetuneResult(Result):
    """What a run did: ``to_dict()`` is what ``finetune.json`` holds and ``from_dict`` (or
    ``FinetuneResult.load(path)``) reads it back (without the trained model: load the adapter with
    ``melayer.load(base, adapter=output)``)."""

    kind = "finetune"

    model: str
    method: FinetuneMethod
    config: dict[str, Any]
    data: dict[str, Any]
    wemask: dict[str, Any] | None
    massive_token: dict[str, Any] | None
    steps: int
    train_loss: float | None
    final_loss: float | None
    runtime_s: float
    tokens: int | None
    resumed_from: str | None
    output: str
    adapter: bool
    intervention: dict[str, Any] | None = None  # the registry method of every training forward, if any
    versions: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    lm: Any = field(default=None, repr=False)  # the trained model (not serialised)
    trainer: Any = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The result as ``finetune.json`` holds it.

        Returns:
            JSON-ready data: the config, the data, the mask, steps, losses, run time, tokens per second, the
            adapter's directory and the library versions (not the trained model itself).
        """
        return {"schema": SCHEMA, "model": self.model, "method": self.method, "config": self.config,
                "data": self.data, "wemask": self.wemask, "massive_token": self.massive_token, "steps": self.steps,
                "train_loss": self.train_loss, "final_loss": self.final_loss, "runtime_s": self.runtime_s,
                "tokens": self.tokens, "tokens_per_s": (self.tokens / self.runtime_s
                                                        if self.tokens and self.runtime_s > 0 else None),
                "resumed_from": self.resumed_from, "output": self.output, "adapter": self.adapter,
                "intervention": self.intervention, "versions": self.versions, **self.extra}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FinetuneResult:
        """The result a ``finetune.json`` holds.

        Args:
            data: a loaded ``finetune.json`` (what :meth:`to_dict` returned).

        Returns:
            The fine-tuning result, without the trained model (load the adapter with ``melayer.load(...,
            adapter=output)``).
        """
        own = {f.name for f in dataclasses.fields(cls)} - {"extra", "lm", "trainer"}
        derived = {"schema", "tokens_per_s"}
        return cls(**{k: data[k] for k in own if k in data},
                   extra={k: v for k, v in data.items() if k not in own | derived})


def _versions() -> dict[str, str]:
    import peft
    import transformers
    import trl

    from melayer.util.version import VERSION

    return {"melayer": VERSION, "torch": torch.__version__, "transformers": transformers.__version__,
            "trl": trl.__version__, "peft": peft.__version__, "python": platform.python_version()}


def last_complete_checkpoint(ckpt_dir: Path) -> str | None:
    """The newest checkpoint whose save finished (transformers writes ``trainer_state.json`` last; a run killed
    while saving leaves a newer, incomplete folder, which is skipped)."""
    done = [p for p in ckpt_dir.glob("checkpoint-*")
            if p.name.rsplit("-", 1)[-1].isdigit() and (p / "trainer_state.json").is_file()]
    return str(max(done, key=lambda p: int(p.name.rsplit("-", 1)[-1]))) if done else None


def check_output(cfg: FinetuneConfig) -> Path | None:
    """Refuse to overwrite a finished run or to mix runs; return the checkpoint to resume from, if any."""
    out = cfg.output_dir
    if out.exists() and not out.is_dir():
        raise MelayerError(f"--output {out} exists and is not a directory")
    ckpt_dir = out / "checkpoints"
    started = ckpt_dir.is_dir() and any(ckpt_dir.glob("checkpoint-*"))
    last = last_complete_checkpoint(ckpt_dir)
    if cfg.resume:
        saved = out / "finetune_config.json"
        if last is not None and saved.is_file():
            before = FinetuneConfig.from_dict(json.loads(saved.read_text()))
            changed = [k for k, v in before.to_dict().items()
                       if k not in ("resume", "output", "schema") and cfg.to_dict().get(k) != v]
            if changed:
                raise MelayerError(f"--resume: settings differ from the interrupted run ({', '.join(changed)}); "
                                   "resume with the same options or use another --output")
        return Path(last) if last else None
    if (out / RESULT_FILE).exists() or started:
        raise MelayerError(f"--output {out} already holds a fine-tuning run; use --resume to continue it or "
                           "another --output")
    return None


def find_massive_token(lm: LM, texts: list[str]) -> tuple[int | None, dict[str, Any]]:
    """Scan training-format texts: the ME layer and the massive token the way training sees them."""
    from melayer.analysis.scan import scan

    result = scan(lm, texts, progress=False)
    first = lm.tokenizer(texts[0], add_special_tokens=True)["input_ids"]
    tokens = result.massive_tokens()[:3] if hasattr(result, "massive_tokens") else []
    info = {"me_layer": result.me_layer, "me_layer_consistency": getattr(result, "me_layer_consistency", None),
            "first_token": lm.tokenizer.convert_ids_to_tokens(first[:1])[0] if first else None,
            "massive_tokens": tokens, "texts": len(texts), "format": "training format (as the trainer tokenises)"}
    return result.me_layer, info


def check_trainable(lm: LM) -> None:
    """Refuse a model whose device map offloads weights (to the CPU or disk): accelerate reloads those from
    their offload copy on every forward, so an update would be lost (full fine-tuning) or a LoRA adapter would sit
    on the ``meta`` placeholders (it yields inf/nan). A split across GPUs, or one device, trains."""
    from melayer.models.devices import is_offloaded

    offloaded = [name for name, mod in lm.model.named_modules() if is_offloaded(mod)]
    if offloaded or any(p.device.type == "meta" for p in lm.model.parameters()):
        example = offloaded[0] if offloaded else "meta parameters"
        raise MelayerError(f"cannot fine-tune {lm.name} with weights offloaded to the CPU or disk by the device map "
                           f"(e.g. {example}): training needs every weight resident; use a --device-map/--max-memory "
                           "that keeps each layer on a GPU or the CPU")


class _LogCallback:
    """Appends each log record to train_log.jsonl (drops records past the resumed step first)."""

    def __init__(self, path: Path, resume_step: int) -> None:
        from melayer.util.io import read_jsonl, write_atomic

        self.path = path
        if path.exists():
            kept = [r for r in read_jsonl(path) if r.get("step", 0) <= resume_step]
            text = "".join(json.dumps(r) + "\n" for r in kept)
            write_atomic(path, lambda p: p.write_text(text))

    def callback(self) -> Any:
        from transformers import TrainerCallback

        from melayer.util.io import append_jsonl

        path = self.path

        class LogToJsonl(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs:
                    append_jsonl(path, {"step": state.global_step, "epoch": state.epoch, "time": time.time(),
                                        **{k: v for k, v in logs.items() if isinstance(v, (int, float))}})

        return LogToJsonl()


def _progress_callback() -> Any:
    """A rich progress bar on stderr: optimiser steps, elapsed / remaining time, the last loss."""
    from rich.progress import Progress, TextColumn
    from transformers import TrainerCallback

    from melayer.util.console import progress_bar

    class RichProgress(TrainerCallback):
        def __init__(self) -> None:
            self.progress: Progress | None = None
            self.task: Any = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.progress = progress_bar(TextColumn("{task.fields[loss]}"))
            self.progress.start()
            self.task = self.progress.add_task("training", total=state.max_steps, completed=state.global_step,
                                               loss="")

        def on_step_end(self, args, state, control, **kwargs):
            if self.progress is not None:
                self.progress.update(self.task, completed=state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.progress is not None and logs and "loss" in logs:
                self.progress.update(self.task, loss=f"loss {logs['loss']:.4f}")

        def on_train_end(self, args, state, control, **kwargs):
            if self.progress is not None:
                self.progress.stop()
                self.progress = None

    return RichProgress()


def _checkpointing(on: bool) -> dict[str, Any]:
    """Gradient checkpointing settings under the name the installed transformers uses: 5.x renamed
    ``gradient_checkpointing*`` to ``activation_checkpointing*`` (the old names warn, and go in v6) and mirrors the
    new values onto the old attributes, which TRL reads. Passing the new name also overrides TRL's default of
    ``gradient_checkpointing=True`` without touching the deprecated field."""
    from transformers import TrainingArguments

    fields = TrainingArguments.__dataclass_fields__
    name = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    return {name: on, f"{name}_kwargs": {"use_reentrant": False} if on else None}


def _training_args(cfg: FinetuneConfig, ckpt_dir: Path) -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    return dict(
        output_dir=str(ckpt_dir), per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps, logging_steps=cfg.logging_steps, save_strategy="steps", save_steps=cfg.save_steps,
        seed=cfg.seed, data_seed=cfg.seed, bf16=cuda and cfg.dtype == "bfloat16", fp16=False, use_cpu=not cuda,
        **_checkpointing(cfg.gradient_checkpointing),
        report_to="none", disable_tqdm=True, dataloader_num_workers=0, warmup_steps=0,
        lr_scheduler_type="linear", full_determinism=False, save_total_limit=2)


def trainer_config(cfg: FinetuneConfig, ckpt_dir: Path) -> Any:
    """The TRL config (``SFTConfig`` / ``DPOConfig`` / ``GRPOConfig``) for ``cfg``: melayer's settings, then
    ``cfg.trl_args`` on top (TRL's other options, passed through as given)."""
    from melayer.finetuning.config import check_trl_args, trl_config_class

    args = _training_args(cfg, ckpt_dir)
    if cfg.method == "sft":
        args.update(max_length=cfg.max_length, packing=False, padding_free=False)
    elif cfg.method == "dpo":
        args.update(max_length=cfg.max_length, beta=cfg.beta)
    else:
        args.update(num_generations=cfg.num_generations, max_completion_length=cfg.max_completion_length,
                    temperature=cfg.temperature, beta=0.0)
    args.update(check_trl_args(cfg.method, cfg.trl_args))
    try:
        return trl_config_class(cfg.method)(**args)
    except (ValueError, TypeError) as exc:  # TRL's own checks of the settings
        raise MelayerError(f"{cfg.method}: {' '.join(str(exc).split())[:300]}") from None


def build_trainer(cfg: FinetuneConfig, lm: LM, rows: list[dict[str, Any]], ckpt_dir: Path,
                  callbacks: list[Any], progress: bool = True) -> Any:
    """The TRL trainer for ``cfg.method`` on ``lm`` (LoRA unless ``cfg.full``)."""
    from datasets import Dataset

    args = trainer_config(cfg, ckpt_dir)
    peft_config = None
    if not cfg.full:
        from peft import LoraConfig

        modules = cfg.lora_target_modules
        target: Any = modules if modules == "all-linear" else [t.strip() for t in modules.split(",") if t.strip()]
        peft_config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                 target_modules=target, task_type="CAUSAL_LM")
    dataset = Dataset.from_list(rows)
    common = dict(model=lm.model, args=args, train_dataset=dataset, processing_class=lm.tokenizer,
                  peft_config=peft_config, callbacks=callbacks)
    try:
        if cfg.method == "sft":
            from trl import SFTTrainer

            return SFTTrainer(**common)
        if cfg.method == "dpo":
            from trl import DPOTrainer

            return DPOTrainer(**common)
        from trl import GRPOTrainer

        return GRPOTrainer(reward_funcs=[gsm8k_reward], **common)
    except ValueError as exc:  # TRL's own checks of the settings
        raise MelayerError(f"{cfg.method}: {' '.join(str(exc).split())[:300]}") from None


def gsm8k_reward(completions: list[Any], gold: list[str], **kwargs: Any) -> list[float | None]:
    """GRPO reward: 1.0 for a strict numeric match with the gold answer (melayer's GSM8K scorer), else 0.0."""
    from melayer.eval.answers import gsm8k_score

    texts = [c[-1]["content"] if isinstance(c, list) else str(c) for c in completions]
    return [gsm8k_score(t, g)["exact_match_strict"] for t, g in zip(texts, gold)]


def _save_final(trainer: Any, cfg: FinetuneConfig, out: Path) -> None:
    """Save the adapter (or full model) through a temp dir, then move the files into ``out``."""
    tmp = Path(tempfile.mkdtemp(prefix=".save-", dir=out))
    try:
        trainer.save_model(str(tmp))
        for item in tmp.iterdir():
            dest = out / item.name
            if dest.is_dir():
                shutil.rmtree(dest)
            os.replace(item, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _training_intervention(cfg: FinetuneConfig, lm: LM, rows: list[dict[str, Any]], chat: bool
                           ) -> tuple[Any, dict[str, Any] | None, dict[str, Any] | None]:
    """The intervention of every training forward, bound to ``lm`` and not yet applied: ``--wemask`` or a registry
    method (``--intervention``), calibrated on training examples in the training format. Returns (the context
    manager or None, the scan of those examples, the record of the registry method or None)."""
    from melayer.interventions.wemask import select_rule, wemask

    if cfg.wemask <= 0 and cfg.intervention is None:
        return None, None, None
    texts = training_texts(lm.tokenizer, rows, chat)
    found, massive = find_massive_token(lm, texts)
    me_layer = cfg.me_layer if cfg.me_layer is not None else found
    if me_layer is None and (cfg.intervention is not None or cfg.layers is None):
        raise MelayerError(f"no ME layer found in {lm.name} on training-format text; pass "
                           + ("--layers or --me-layer" if cfg.intervention is None else "--me-layer"))
    if cfg.intervention is None:
        wm = wemask(lm, cfg.wemask, layers=cfg.layers, select=select_rule(cfg.select), gamma=cfg.gamma,
                    me_layer=cfg.me_layer if cfg.layers is not None else me_layer)
        if cfg.me_layer is None and cfg.layers is None:
            wm.me_layer_source = "scan of training-format examples"
        return wm, massive, None
    from melayer.interventions.methods import Calibration, training_spec

    spec = training_spec(cfg.intervention)
    source = "given" if cfg.me_layer is not None else "scan of training-format examples"
    cal = Calibration(lm, texts, source=f"the first {len(texts)} training examples in the training format",
                      me_layer=me_layer)
    cal.me_layer_source = source
    bound = spec.bind(lm, cal)
    if isinstance(bound, WeMask) and bound.me_layer is not None:
        bound.me_layer_source = source
    record = {"spec": spec.label, "name": spec.name, "params": dict(spec.params),
              "rule": bound.describe() if hasattr(bound, "describe") else spec.label, "calibration": cal.to_dict()}
    return bound, massive, record


def finetune(config: FinetuneConfig | None = None, *, lm: LM | None = None, progress: bool = True,
             callbacks: list[Any] | None = None, **options: Any) -> FinetuneResult:
    """Fine-tune (SFT, DPO or GRPO on TRL + peft) with WeMask on every training forward (``melayer finetune``).

    >>> melayer.finetune(model="smollm2-135m", method="sft", wemask=0.05, max_steps=20, learning_rate=1e-4,
    ...                  trl_args={"warmup_steps": 2}, output="out/ft")
    >>> melayer.finetune(melayer.FinetuneConfig(model="smollm2-135m", wemask=0.05))

    Args:
        config: all settings at once (default: ``FinetuneConfig(**options)``).
        lm: a loaded model to train (modified in place) instead of loading ``config.model``.
        progress: show a progress bar.
        callbacks: more ``transformers`` trainer callbacks.
        **options: any :class:`~melayer.finetuning.config.FinetuneConfig` field (they are listed in this
            function's signature, under TRL's names where TRL has the option: ``learning_rate``,
            ``per_device_train_batch_size``, ``gradient_accumulation_steps``, ``num_train_epochs``, ...);
            ``trl_args={...}`` passes any other option of the method's TRL config through (e.g.
            ``{"warmup_steps": 10, "weight_decay": 0.01}``). With ``config``, they override its values.

    Returns:
        The run's settings, losses, speed and where the adapter was written, as a :class:`FinetuneResult`.

    Raises:
        MelayerError: a bad setting, unreadable data, or an output directory holding another run.
    """
    from melayer.util.io import write_json

    if config is None:
        cfg = FinetuneConfig.from_options(**options)
    else:
        cfg = FinetuneConfig.from_options(**{**dataclasses.asdict(config), **options}) if options else config
    cfg.validate()
    resume_from = check_output(cfg)
    records = load_records(cfg.data, cfg.method, cfg.limit)
    if cfg.method == "dpo" and records.kind == "gsm8k" and cfg.limit is None and cfg.data == "gsm8k":
        raise MelayerError("dpo on gsm8k generates a rejected answer per problem: give --limit N (e.g. 64)")
    rows = plain_rows(records, cfg.method)
    import datasets

    datasets.disable_progress_bars()  # the run has its own progress bar
    if lm is None:
        lm = load(cfg.model, dtype=cfg.dtype, device_map=cfg.device_map, max_memory=cfg.max_memory,
                  progress=progress)
    check_trainable(lm)
    torch.manual_seed(cfg.seed)
    chat = use_chat(lm.tokenizer, cfg.chat)
    extra: dict[str, Any] = {"chat_template": chat}
    if cfg.method == "dpo" and records.kind == "gsm8k":
        from melayer.finetuning.pairs import dpo_pairs

        rows, extra["pairs"] = dpo_pairs(lm, rows, chat, cfg.rejected_max_new_tokens, progress=progress)
    rows = [{k: v for k, v in r.items() if cfg.method == "grpo" or k != "gold"} for r in rows]

    out = cfg.output_dir
    wm, massive, intervention = _training_intervention(cfg, lm, rows, chat)
    ckpt_dir = out / "checkpoints"
    resume_step = int(resume_from.name.rsplit("-", 1)[-1]) if resume_from else 0
    log = _LogCallback(out / LOG_FILE, resume_step)
    shown = [_progress_callback()] if progress and not os.environ.get("MELAYER_QUIET") else []
    trainer = build_trainer(cfg, lm, trainer_rows(rows, chat), ckpt_dir, [log.callback(), *shown, *(callbacks or [])],
                    progress=progress)
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # the log goes to train_log.jsonl and the progress bar, not stdout
    out.mkdir(parents=True, exist_ok=True)  # only now: every check (data, model, mask, TRL's settings) passed
    write_json(out / "finetune_config.json", cfg.to_dict())
    start = time.time()
    with contextlib.ExitStack() as applied:  # every hook off again when training ends or fails
        if wm is not None:
            applied.enter_context(wm)
        output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    runtime = time.time() - start

    from melayer.util.io import read_jsonl

    logged = [r for r in read_jsonl(out / LOG_FILE) if "loss" in r]
    tokens = next((int(r["num_tokens"]) for r in reversed(logged) if "num_tokens" in r), None)
    wm_dict = None
    if isinstance(wm, WeMask):  # wemask.json: what melayer.load(..., adapter=) applies again
        wm_dict = {**wm.to_dict(), "active": False, "massive_token": massive}
        wm_dict.pop("masked_tokens", None)
    if intervention is not None and wm is not None:
        settings = wm_dict or (wm.to_dict() if hasattr(wm, "to_dict") else {})
        intervention["settings"] = {k: v for k, v in settings.items() if k != "masked_tokens"}
    result = FinetuneResult(
        model=lm.name, method=cfg.method, config=cfg.to_dict(), data=records.to_dict(), wemask=wm_dict,
        massive_token=massive, steps=int(trainer.state.global_step),
        train_loss=float(output.training_loss) if output is not None else None,
        final_loss=float(logged[-1]["loss"]) if logged else None, runtime_s=runtime, tokens=tokens,
        resumed_from=str(resume_from) if resume_from else None, output=str(out), adapter=not cfg.full,
        intervention=intervention, versions=_versions(), extra=extra)
    _save_final(trainer, cfg, out)
    write_json(out / WEMASK_FILE, wm_dict if wm_dict is not None else {"schema": "melayer.wemask/1", "rate": 0.0,
                                                                       "rule": "WeMask off (rate 0)"})
    write_json(out / RESULT_FILE, result.to_dict())
    result.lm, result.trainer = lm, trainer
    return result


def _signature() -> inspect.Signature:
    """``finetune``'s signature with every :class:`FinetuneConfig` field spelled out, so that ``help()``, IDEs
    and ``inspect.signature`` show the options the ``**options`` of the definition takes."""
    own = inspect.signature(finetune)
    params = [p for p in own.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    names = {p.name for p in params}
    params += [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=f.type,
                                 default=f.default_factory() if callable(f.default_factory) else f.default)
               for f in dataclasses.fields(FinetuneConfig) if f.name not in names]
    return own.replace(parameters=params)


finetune.__signature__ = _signature()  # type: ignore[attr-defined]
