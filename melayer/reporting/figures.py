"""Figures that show what matters, built from melayer's JSON dicts (matplotlib, Agg).

Each builder returns a matplotlib Figure; :func:`to_svg` turns one into an inline ``<svg>`` element for the
HTML report, and :func:`melayer.reporting.plots.save` writes it as PNG next to a command's JSON.

- :func:`magnitude_map`: the massive token's |a| over layers x dims on a log colour scale, and the |a| of
  the dims that matter (persistent, precursor, transient) against the criterion's thresholds, so a precursor
  of ~3e3 shows next to a persistent dim of ~1e5 (a linear 3-D surface hides it).
- :func:`dose_response`: the paired difference of each metric to rate 0 with its paired bootstrap CI and
  McNemar's p, and the sink rate per rate.
- :func:`forest`: method x metric, each condition's paired difference to the unmodified model with its CI.
- :func:`training_curves`: loss, learning rate, gradient norm and rewards per step of a fine-tuning log.
"""

from __future__ import annotations

import io
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.ticker import MaxNLocator

from melayer.reporting.format import conditions
from melayer.reporting.plots import plain_log_labels, plt, save, tex_safe, tight_layout

_SVG_START = re.compile(r"<svg\b")
_SVG_REF = re.compile(r'(\bid="|url\(#|href="#)([^")]+)')


def to_svg(fig: Any, salt: str, alt: str = "") -> str:
    """The figure as one ``<svg>`` element (text kept as text, ids unique per ``salt``), then closed."""
    buf = io.StringIO()
    try:
        plain_log_labels(fig)
        with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": salt}):
            fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None, "Creator": "melayer"})
    finally:
        plt.close(fig)
    text = buf.getvalue()
    m = _SVG_START.search(text)
    if m is None:  # pragma: no cover - matplotlib always writes an <svg> root
        raise RuntimeError("matplotlib wrote no <svg> element")
    # matplotlib names elements figure_1, axes_1, ... in every figure: prefix every id (and each reference to
    # one) so that several figures can share one page
    svg = _SVG_REF.sub(lambda r: f"{r.group(1)}{salt}-{r.group(2)}", text[m.start():])
    label = alt.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;").replace(">", "&gt;")
    return svg.replace("<svg ", f'<svg role="img" aria-label="{label}" ', 1)


# --------------------------------------------------------------------------------------------------
# scan: the massive token over layers x dims


def profile_dims(scan: dict[str, Any], limit: int = 6) -> list[tuple[int, str]]:
    """The dims worth drawing for the profiled token: persistent massive dims, then precursor and transient
    dims seen on that token's position (most frequent first), then (if none) the largest dims."""
    prof = scan["massive_token_profile"]
    pos = prof["position"]
    picked: list[tuple[int, str]] = [(int(d), "persistent") for d in scan.get("massive_dims") or []]
    for key, kind in (("precursors", "precursor"), ("transient", "transient")):
        counts = Counter(r["dim"] for r in scan.get(key) or [] if r["position"] == pos)
        for d, _ in counts.most_common():
            if all(d != p for p, _ in picked):
                picked.append((int(d), kind))
    if not picked:
        grid = _grid(prof)
        picked = [(int(d), "largest") for d in np.argsort(-np.nanmax(grid, axis=0))[:3]]
    return picked[:limit]


def _grid(prof: dict[str, Any]) -> np.ndarray:
    return np.array([[np.nan if v is None else abs(v) for v in row] for row in prof["abs"]], dtype=float)


def magnitude_map(scan: dict[str, Any]) -> Any:
    """Left: log-colour heatmap of the profiled token's |a| (rows: layers, columns: hidden dims), dims of
    interest ticked on top. Right: those dims' |a| per layer (log) with the massive and persistence
    thresholds of the criterion; the ME layer dashed."""
    prof = scan["massive_token_profile"]
    grid = _grid(prof)
    n_layers = grid.shape[0]
    crit = scan.get("threshold") or {}
    dims = profile_dims(scan)
    me = scan.get("me_layer")
    positive = grid[np.isfinite(grid) & (grid > 0)]
    vmax = float(positive.max()) if positive.size else 1.0
    vmin = max(float(np.percentile(positive, 5)) if positive.size else 1e-3, vmax * 1e-7)
    fig, axes = plt.subplots(1, 2, figsize=(12, max(3.6, 0.2 * n_layers + 1.8)), gridspec_kw={"width_ratios": [1.6, 1]})
    ax = axes[0]
    im = ax.imshow(np.clip(np.nan_to_num(grid, nan=vmin), vmin, None), aspect="auto", cmap="magma",
                   norm=LogNorm(vmin=vmin, vmax=vmax), interpolation="none", origin="upper")
    fig.colorbar(im, ax=ax, label="|a| (log scale)", pad=0.01)
    ax.set_xlabel("hidden dim")
    ax.set_ylabel("decoder layer (output)")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    if me is not None:
        ax.axhline(me - 0.5, color="cyan", lw=1, ls="--")
    top = ax.secondary_xaxis("top")
    top.set_xticks([d for d, _ in dims], [f"{d}\n{k[:4]}." for d, k in dims], fontsize=7)
    ax.set_title(f"token {tex_safe(repr(prof['token']))} (prompt {prof['prompt']}, position {prof['position']})",
                 fontsize=9, pad=22)
    ax = axes[1]
    layers = np.arange(n_layers)
    colors = {"persistent": "tab:red", "precursor": "tab:blue", "transient": "tab:green", "largest": "tab:gray"}
    styles = {"persistent": "-", "precursor": "--", "transient": ":", "largest": "-"}
    for d, kind in dims:
        ax.plot(layers, np.maximum(grid[:, d], vmin), styles[kind], marker="o", ms=3, color=colors[kind],
                label=f"dim {d} ({kind})")
    ax.plot(layers, np.maximum(np.nanmedian(grid, axis=1), vmin), color="gray", lw=1, label="median over dims")
    per_layer = scan.get("per_layer") or []
    if crit and len(per_layer) == n_layers:
        med = np.array([r["median"] for r in per_layer], dtype=float)
        ax.plot(layers, np.maximum(crit["abs_min"], crit["median_ratio"] * med), color="black", lw=1, ls="--",
                label=f"massive: >{crit['abs_min']:g} and >{crit['median_ratio']:g}x layer median")
        ax.plot(layers, np.maximum(crit["abs_min"], crit["persist_ratio"] * med), color="black", lw=0.8, ls=":",
                label=f"persists: >{crit['persist_ratio']:g}x layer median")
    if me is not None:
        ax.axvline(me, color="red", ls="--", lw=1)
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("decoder layer (output)")
    ax.set_ylabel("|a| of the profiled token")
    ax.set_title("dims that matter vs the criterion" + (f" (ME layer {me})" if me is not None else ""), fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(tex_safe(scan["model"]), fontsize=10)
    tight_layout(fig)
    return fig


# --------------------------------------------------------------------------------------------------
# compare: the dose-response as paired differences


def _finite(v: Any) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def dose_response(data: dict[str, Any], higher_is_better: dict[str, bool] | None = None) -> Any:
    """One panel per metric: the difference to rate 0 over the same samples with its paired bootstrap 95% CI
    (rate 0 is 0 by construction), McNemar's p above each binary point; then the sink rate per rate."""
    rows = data["per_rate"]
    names = list(rows[0]["metrics"])
    with_sinks = all(_finite(r.get("sink_rate")) for r in rows)
    panels = names + (["sink rate"] if with_sinks else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(3.9 * len(panels), 3.7), squeeze=False)
    x = np.arange(len(rows))
    labels = [f"{r['rate']:g}\nk={r.get('wemask', {}).get('k', 0)}" for r in rows]
    for ax, name in zip(axes[0], panels):
        if name == "sink rate":
            ax.plot(x, [r["sink_rate"] for r in rows], "-s", color="tab:red", ms=4)
            ax.set_ylim(0, 1.05)
            used = data["sinks"]["prompts"] - (data["sinks"].get("prompts_skipped_too_short") or 0)
            ax.set_title(f"sink rate (eps={data['sinks']['epsilon']:g}, {used} prompts)", fontsize=9)
            ax.set_ylabel("share of (layer, head) pairs", fontsize=8)
        else:
            diff, lo, hi, ps = [], [], [], []
            for r in rows:
                m = r["metrics"][name]
                vs = m.get("vs_baseline")
                if r["rate"] == 0 or vs is None:
                    diff.append(0.0 if r["rate"] == 0 else np.nan)
                    lo.append(np.nan)
                    hi.append(np.nan)
                else:
                    diff.append(vs["diff"] if _finite(vs["diff"]) else np.nan)
                    ci = vs.get("ci95") or [None, None]
                    lo.append(ci[0] if _finite(ci[0]) else np.nan)
                    hi.append(ci[1] if _finite(ci[1]) else np.nan)
                ps.append((m.get("mcnemar") or {}).get("p"))
            d, lo_a, hi_a = np.array(diff), np.array(lo), np.array(hi)
            err = np.vstack([np.nan_to_num(d - lo_a, nan=0.0).clip(0), np.nan_to_num(hi_a - d, nan=0.0).clip(0)])
            ax.axhline(0, color="gray", lw=0.8, ls="--")
            ax.errorbar(x, d, yerr=err, fmt="-o", capsize=4, ms=4, color="tab:blue")
            for xi, yi, p in zip(x, d, ps):
                if p is not None and np.isfinite(yi):
                    ax.annotate(f"p={p:.2g}", (xi, yi), textcoords="offset points", xytext=(4, 6), fontsize=7)
            better = (higher_is_better or {}).get(name)
            arrow = "" if better is None else (" (higher is better)" if better else " (lower is better)")
            ax.set_title(f"{tex_safe(name)}: difference to rate 0{arrow}", fontsize=9)
            ax.set_ylabel("paired difference, 95% bootstrap CI", fontsize=8)
        ax.set_xticks(x, labels, fontsize=8)
        ax.set_xlim(-0.4, len(rows) - 0.4)
        ax.set_xlabel("WeMask rate", fontsize=8)
    fig.suptitle(f"{tex_safe(data['model'])} - {tex_safe(data['task'])} (n={data['settings']['n_samples']} paired "
                 f"samples, select={data['select']}, ME layer {data['me_layer']})", fontsize=9)
    tight_layout(fig)
    return fig


def forest(data: dict[str, Any], higher_is_better: dict[str, bool] | None = None) -> Any:
    """Method x metric forest plot: one panel per metric, one row per condition (WeMask rates, then the
    methods), the paired difference to the unmodified model with its bootstrap 95% CI; filled markers where the
    Benjamini-Hochberg-adjusted McNemar p <= 0.05."""
    conds = conditions(data)
    metrics = list(data["per_rate"][0]["metrics"])
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics) + 2.2, 0.42 * len(conds) + 1.7),
                             sharey=True, squeeze=False)
    ys = list(range(len(conds)))[::-1]
    for ax, name in zip(axes[0], metrics):
        for y, (_label, row) in zip(ys, conds):
            m = row["metrics"].get(name) or {}
            vs, mc = m.get("vs_baseline") or {}, m.get("mcnemar") or {}
            diff, ci = vs.get("diff"), vs.get("ci95") or [None, None]
            if not _finite(diff):
                continue
            lo, hi = (ci[0], ci[1]) if _finite(ci[0]) and _finite(ci[1]) else (diff, diff)
            ax.plot([lo, hi], [y, y], color="tab:blue", lw=1.5)
            p_bh = mc.get("p_bh")
            sig = isinstance(p_bh, (int, float)) and _finite(p_bh) and p_bh <= 0.05
            ax.plot([diff], [y], "o", color="tab:blue", markerfacecolor="tab:blue" if sig else "white", ms=5)
        ax.axvline(0, color="gray", lw=0.8, ls="--")
        better = (higher_is_better or {}).get(name)
        arrow = "" if better is None else (" (higher is better)" if better else " (lower is better)")
        ax.set_title(f"{tex_safe(name)}{arrow}", fontsize=9)
        ax.set_xlabel("paired difference to unmodified, 95% CI", fontsize=8)
    axes[0][0].set_yticks(ys, [tex_safe(label) for label, _ in conds], fontsize=8)
    axes[0][0].set_ylim(-0.7, len(conds) - 0.3)
    fig.suptitle(f"{tex_safe(data['model'])} - {tex_safe(data['task'])} ({data['settings']['n_samples']} paired "
                 "samples); filled: BH-adjusted McNemar p <= 0.05", fontsize=9)
    tight_layout(fig)
    return fig


# --------------------------------------------------------------------------------------------------
# fine-tuning: curves per step

_SKIP = {"step", "epoch", "time", "total_flos", "train_runtime", "train_samples_per_second",
         "train_steps_per_second", "train_loss"}


def curve_groups(records: list[dict[str, Any]], min_points: int = 2) -> dict[str, list[str]]:
    """Numeric log keys with at least ``min_points`` values, grouped into panels (loss, rewards/accuracy, lr,
    grad norm)."""
    counts: Counter[str] = Counter()
    for r in records:
        counts.update(k for k, v in r.items() if k not in _SKIP and _finite(v) and not isinstance(v, bool))
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
            pts = [(r.get("step", i), r[k]) for i, r in enumerate(records) if _finite(r.get(k))]
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


def token_surface(scan: dict[str, Any], path: str | Path) -> Path | None:
    """The massive token's |a| over layers x dims on a log scale, next to the dims that matter against the
    criterion (see :func:`magnitude_map`); None without a profile."""
    if not scan.get("massive_token_profile"):
        return None
    return save(magnitude_map(scan), path)
