"""Rendering of a fine-tuning run (``finetune.json`` + ``train_log.jsonl``): the training curves (PNG and in the
report), a one-screen summary (drawn by the CLI) and the report's section."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from matplotlib.ticker import MaxNLocator

from melayer.reporting.blocks import Figures, Section, p, table
from melayer.reporting.format import num
from melayer.reporting.plotting import finite, plt, save, tex_safe, tight_layout
from melayer.reporting.results import KINDS

_SKIP = {"step", "epoch", "time", "total_flos", "train_runtime", "train_samples_per_second",
         "train_steps_per_second", "train_loss"}


def curve_groups(records: list[dict[str, Any]], min_points: int = 2) -> dict[str, list[str]]:
    """Numeric log keys with at least ``min_points`` values, grouped into panels (loss, rewards/accuracy, lr,
    grad norm)."""
    counts: Counter[str] = Counter()
    for r in records:
        counts.update(k for k, v in r.items() if k not in _SKIP and finite(v) and not isinstance(v, bool))
    keys = [k for k in counts if counts[k] >= min_points]
    groups: dict[str, list[str]] = {"loss": [], "reward / accuracy": [], "learning rate": [], "gradient norm": []}
    for k in keys:
        low = k.lower()
        if "loss" in low:
            groups["loss"].append(k)
        elif any(w in low for w in ("reward", "accura", "margin")):
            groups["reward / accuracy"].append(k)
        elif "learning_rate" in low or low == "lr":
            groups["learning rate"].append(k)
        elif "grad_norm" in low:
            groups["gradient norm"].append(k)
    return {g: ks[:6] for g, ks in groups.items() if ks}


def training_curves(records: list[dict[str, Any]], title: str, min_points: int = 2) -> Any:
    """One panel per group of :func:`curve_groups` (the report's figure and ``melayer finetune``'s
    ``loss_curve.png``; a run of one logged step still shows its loss as one point with ``min_points=1``)."""
    groups = curve_groups(records, min_points) or {"loss": []}
    fig, axes = plt.subplots(1, len(groups), figsize=(3.9 * len(groups), 3.4), squeeze=False)
    for ax, (group, keys) in zip(axes[0], groups.items()):
        steps: set[Any] = set()
        for k in keys:
            pts = [(r.get("step", i), r[k]) for i, r in enumerate(records) if finite(r.get(k))]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", ms=2.5, lw=1.2, label=tex_safe(k))
            steps.update(p[0] for p in pts)
        ax.set_xlabel("optimizer step", fontsize=8)
        ax.set_title(group, fontsize=9)
        if len(steps) == 1:  # one logged step: its number, not fractional ticks around it
            ax.set_xticks(sorted(steps))
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if len(keys) > 1 or group in ("loss", "reward / accuracy"):
            ax.legend(fontsize=7)
    fig.suptitle(tex_safe(title), fontsize=9)
    tight_layout(fig)
    return fig


def report_extra(path: Path) -> dict[str, Any]:
    """The training log beside ``finetune.json`` (``train_log.jsonl``), when there is one."""
    log = path.parent / "train_log.jsonl"
    if not log.is_file():
        return {}
    from melayer.util.io import read_jsonl

    return {"log": read_jsonl(log)}


def loss_curve(log: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """The report's training curves (loss, rewards, learning rate, gradient norm per optimiser step, from
    ``train_log.jsonl`` records) as a PNG."""
    return save(training_curves(log, title or "training", min_points=1), path)


def summary(result: dict[str, Any]) -> list[str]:
    """A few lines for the terminal."""
    w = result.get("wemask") or {}
    lines = [f"{result['method']} on {result['model']}: {result['steps']} steps, training loss "
             f"{num(result.get('train_loss'), spec='.4f')} (last logged {num(result.get('final_loss'), spec='.4f')}), "
             f"{result['runtime_s']:.0f} s" + (f", {result['tokens_per_s']:.1f} tokens/s"
                                               if result.get("tokens_per_s") else "")]
    lines.append(f"wemask: {w.get('rule', 'off')}")
    mt = result.get("massive_token") or {}
    if mt:
        lines.append(f"training format: first token {mt.get('first_token')!r}, ME layer {mt.get('me_layer')}")
    if result.get("resumed_from"):
        lines.append(f"resumed from {result['resumed_from']}")
    return lines


def finetune_sections(d: dict[str, Any], figs: Figures, log: list[dict[str, Any]] | None = None) -> list[Section]:
    cfg = d.get("config") or {}
    wm = d.get("wemask") or {}
    blocks: list[dict[str, Any]] = [
        p("Model <b>{}</b>, method <b>{}</b>: {} steps, final loss {}, mean training loss {}, {} s ({} tokens/s).",
          d.get("model", "?"), d.get("method", "?"), d.get("steps", "-"), num(d.get("final_loss")),
          num(d.get("train_loss")), num(d.get("runtime_s"), 3), num(d.get("tokens_per_s"), 3)),
        p("WeMask during training: {}.", wm.get("rule") or (f"rate {num(wm.get('rate'))}" if wm else "none")),
    ]
    keys = [k for k in ("learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps",
                        "num_train_epochs", "max_steps", "lora_r", "lora_alpha", "lora_target_modules", "full", "seed",
                        "data", "limit", "lr", "batch_size", "grad_accum", "epochs", "target") if k in cfg]
    rows = [[k, cfg[k]] for k in keys] + [[f"TRL: {k}", v] for k, v in (cfg.get("trl_args") or {}).items()]
    if rows:
        blocks.append(table("Training settings", ["setting", "value"], rows, numeric=False))
    if log and curve_groups(log):
        blocks.append(figs.figure(lambda: training_curves(log, f"{d.get('model', '')} - {d.get('method', '')}"),
                                  "Training curves per optimizer step from train_log.jsonl.",
                                  "Line charts of training loss and other logged values per step."))
    elif log is not None:
        blocks.append(p("train_log.jsonl holds fewer than two logged steps: no curve to draw."))
    return [{"id": "", "title": f"{KINDS['finetune'].title}: {d.get('method', '')}", "blocks": blocks}]
