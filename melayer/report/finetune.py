"""Rendering of a fine-tuning run: the loss curve (PNG) and a one-screen summary (drawn by the CLI)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from melayer.report.plots import plt, save


def loss_curve(log: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Training loss (and reward, for GRPO) per optimiser step, from ``train_log.jsonl`` records."""
    steps = [r["step"] for r in log if "loss" in r]
    losses = [r["loss"] for r in log if "loss" in r]
    rewards = [(r["step"], r["reward"]) for r in log if "reward" in r]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(steps, losses, marker="o", ms=3, lw=1.2, label="loss")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("training loss")
    if rewards:
        ax2 = ax.twinx()
        ax2.plot([s for s, _ in rewards], [v for _, v in rewards], color="tab:green", lw=1, label="reward")
        ax2.set_ylabel("mean reward")
    ax.set_title(title or "training loss", fontsize=10)
    ax.grid(alpha=0.3)
    return save(fig, path)


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
