"""Rendering of a fine-tuning run: the training curves (PNG) and a one-screen summary (drawn by the CLI)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from melayer.report.figures import training_curves
from melayer.report.plots import save


def loss_curve(log: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """The report's training curves (loss, rewards, learning rate, gradient norm per optimiser step, from
    ``train_log.jsonl`` records) as a PNG."""
    return save(training_curves(log, title or "training", min_points=1), path)


def summary(result: dict[str, Any]) -> list[str]:
    """A few lines for the terminal."""
    w = result.get("wemask") or {}
    lines = [f"{result['method']} on {result['model']}: {result['steps']} steps, training loss "
             f"{_f(result.get('train_loss'))} (last logged {_f(result.get('final_loss'))}), "
             f"{result['runtime_s']:.0f} s" + (f", {result['tokens_per_s']:.1f} tokens/s"
                                               if result.get("tokens_per_s") else "")]
    lines.append(f"wemask: {w.get('rule', 'off')}")
    mt = result.get("massive_token") or {}
    if mt:
        lines.append(f"training format: first token {mt.get('first_token')!r}, ME layer {mt.get('me_layer')}")
    if result.get("resumed_from"):
        lines.append(f"resumed from {result['resumed_from']}")
    return lines


def _f(x: Any) -> str:
    return "-" if x is None else f"{x:.4f}"
