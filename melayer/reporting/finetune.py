"""Rendering of a fine-tuning run: the training curves (PNG) and a one-screen summary (drawn by the CLI)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from melayer.reporting.figures import training_curves
from melayer.reporting.format import num
from melayer.reporting.plots import save


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


