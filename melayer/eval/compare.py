"""``melayer.eval.compare``: the same samples at several WeMask rates, paired against rate 0 (the baseline).

Every rate is a normal :func:`melayer.eval.run` in ``DIR/rate_<r>/`` (so a killed compare resumes), the ME
layer is found once (one scan) and reused for every rate, and each rate is reported with the paired difference
to the baseline, a paired bootstrap 95% CI (same resampled sample indices for both runs), McNemar's exact p for
0/1 metrics, and the attention-sink rate measured with and without the mask.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from melayer.eval.runner import EvalResult, run
from melayer.eval.stats import N_BOOT, SEED, mcnemar, outcomes, paired_bootstrap
from melayer.eval.tasks import get_task
from melayer.models.chat import ChatSetting
from melayer.models.loading import LM
from melayer.util.console import plain, status
from melayer.util.errors import MelayerError
from melayer.util.results import Result

if TYPE_CHECKING:
    from melayer.interventions.wemask import SelectRule

SCHEMA = "melayer.compare/1"
DEFAULT_RATES = (0.0, 0.005, 0.01, 0.05)  # each masks >= 1 dim at hidden size 200 or more
SINK_PROMPTS = 16
SINK_EPSILON = 0.3


def parse_rates(rates: str | Sequence[float]) -> list[float]:
    """"0,0.001,0.01" or a list -> sorted unique rates in [0, 1], always including 0 (the baseline)."""
    if isinstance(rates, str):
        parts = [p.strip() for p in rates.split(",") if p.strip()]
        if not parts:
            raise MelayerError("--rates is empty: give e.g. 0,0.005,0.01,0.05")
        try:
            values = [float(p) for p in parts]
        except ValueError:
            raise MelayerError(f"--rates must be comma-separated numbers in [0, 1] (got {rates!r})") from None
    else:
        values = [float(r) for r in rates]
    bad = [v for v in values if not 0.0 <= v <= 1.0]
    if bad:
        raise MelayerError(f"WeMask rate {bad[0]:g} is out of range: rates are fractions of the hidden size in [0, 1]")
    return sorted(set(values) | {0.0})


def rate_dir(rate: float) -> str:
    """``rate_0.01``: the short form when it reads back as the same number, else every digit (``%g`` alone maps
    0.1234561 and 0.1234562 to one directory)."""
    short = f"{rate:g}"
    return f"rate_{short if float(short) == rate else repr(float(rate))}"


def _sinks(lm: LM, prompts: list[str], intervention: Any = None) -> tuple[float, int]:
    """(sink rate, prompts skipped as too short) of ``lm`` on ``prompts``, under ``intervention`` if given."""
    from melayer.analysis.sinks import measure_sinks

    with intervention if intervention is not None else contextlib.nullcontext():
        res = measure_sinks(lm, prompts, epsilon=SINK_EPSILON)
    return float(res.sink_rate), len(getattr(res, "skipped", []) or [])


def sinks_available() -> str | None:
    """None if ``melayer.analysis.sinks.measure_sinks`` is importable, else why not."""
    try:
        from melayer.analysis.sinks import measure_sinks  # noqa: F401
    except ImportError as exc:
        return f"melayer.analysis.sinks.measure_sinks is not available ({exc})"
    return None


@dataclass
class CompareResult(Result):
    """Result of :func:`compare`; ``to_dict()`` is what ``compare.json`` holds and ``from_dict`` (or
    ``CompareResult.load(path)``) reads it back (the per-rate evaluations stay in their ``rate_*/`` folders)."""

    kind = "compare"

    task: str
    model: str
    rates: list[float]
    me_layer: int | None
    me_layer_source: str
    select: SelectRule
    gamma: float
    layers: list[int] | None
    rows: list[dict[str, Any]]
    settings: dict[str, Any]
    sinks: dict[str, Any]
    runs: dict[float, EvalResult] = field(default_factory=dict, repr=False)
    output: str | None = None
    elapsed_s: float = 0.0
    methods: list[dict[str, Any]] = field(default_factory=list)
    calibration: dict[str, Any] | None = None
    massive: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The result as ``compare.json`` holds it.

        Returns:
            JSON-ready data: the settings, one row per rate (and method) with its paired comparison, the sink rates.
        """
        return {
            "schema": SCHEMA,
            "task": self.task,
            "model": self.model,
            "rates": self.rates,
            "me_layer": self.me_layer,
            "me_layer_source": self.me_layer_source,
            "select": self.select,
            "gamma": self.gamma,
            "layers": self.layers,
            "settings": self.settings,
            "sinks": self.sinks,
            "per_rate": self.rows,
            "per_method": self.methods,
            "calibration": self.calibration,
            "massive_downstream": self.massive,
            "multiple_comparisons": {"method": "benjamini-hochberg", "scope": "every McNemar test of this table "
                                     "(rates and methods, all binary metrics); adjusted p in mcnemar.p_bh"},
            "output": self.output,
            "elapsed_s": round(self.elapsed_s, 2),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompareResult:
        """The result a ``compare.json`` holds.

        Args:
            data: a loaded ``compare.json`` (what :meth:`to_dict` returned).

        Returns:
            The comparison.
        """
        return cls(task=data["task"], model=data["model"], rates=data["rates"], me_layer=data["me_layer"],
                   me_layer_source=data["me_layer_source"], select=data["select"], gamma=data["gamma"],
                   layers=data["layers"], rows=data["per_rate"], settings=data["settings"], sinks=data["sinks"],
                   output=data["output"], elapsed_s=data["elapsed_s"], methods=data.get("per_method") or [],
                   calibration=data.get("calibration"), massive=data.get("massive_downstream"))


def compare(
    lm: LM,
    task: str,
    rates: str | Sequence[float] = DEFAULT_RATES,
    limit: int | None = None,
    batch_size: int = 8,
    output: str | Path | None = None,
    *,
    select: SelectRule = "activation",
    layers: str | Sequence[int] | None = None,
    gamma: float = 1.0,
    me_layer: int | None = None,
    max_new_tokens: int | None = None,
    chat: ChatSetting = "auto",
    sinks: bool = True,
    n_boot: int = N_BOOT,
    seed: int = SEED,
    overwrite: bool = False,
    progress: bool = True,
    methods: Sequence[str | Any] = (),
    **task_options: Any,
) -> CompareResult:
    """Evaluate one task at several WeMask rates on the same samples and compare every rate with rate 0
    (``melayer compare``): paired differences, bootstrap intervals, McNemar, sink rates.

    Args:
        lm: the model.
        task: a task name (``melayer.eval.TASKS``).
        rates: the WeMask rates, a list or a comma-separated string (0 is added: the baseline).
        limit: use the first this many samples (None: all).
        batch_size: samples per forward pass.
        output: a directory for ``compare.json`` and one resumable evaluation per rate (None: nothing written).
        select: the WeMask dim rule, ``"activation"`` or ``"weight"`` (see :func:`melayer.wemask`).
        layers: the layers to mask (default: every layer after the ME layer).
        gamma: the masked dims are scaled by ``1 - gamma``.
        me_layer: the ME layer, when known (else found by a scan).
        max_new_tokens: the generation budget of generative tasks (None: the task's).
        chat: use the chat template: ``True``, ``False`` or ``"auto"``.
        sinks: also measure the sink rate at each rate.
        n_boot: bootstrap resamples.
        seed: the bootstrap seed.
        overwrite: discard previous runs with other settings in ``output``.
        progress: show progress bars.
        methods: interventions from the registry, e.g. ``"act"`` or ``"wemask_before:rate=0.01"`` (see
            :data:`melayer.interventions.methods.METHODS`), each run on the same samples in ``output/method_<label>``.
        **task_options: the task's own options (e.g. ``num_fewshot``).

    Returns:
        Every rate's metrics and its paired comparison with the baseline, as a :class:`CompareResult`.

    Raises:
        MelayerError: an unknown task, a bad rate or setting, or ``output`` holding other runs.
    """
    from melayer.analysis.me_layer import find_me_layer
    from melayer.interventions.wemask import parse_layers, wemask

    t0 = time.time()
    rates = parse_rates(rates)
    if limit is not None and limit < 1:
        raise MelayerError(f"--limit must be a positive number of samples (got {limit})")
    the_task = get_task(task, **task_options)
    samples = the_task.load(limit, lm=lm)
    layer_list = parse_layers(layers, lm.num_layers) if layers is not None else None
    source = "given" if me_layer is not None else "not needed"
    if me_layer is None and layer_list is None and any(r > 0 for r in rates):
        source = "scan"
        me_layer = find_me_layer(lm, progress=progress, hint="; pass --me-layer or --layers")
    masks = {rate: wemask(lm, rate, layers=layer_list, select=select, gamma=gamma, me_layer=me_layer)
             for rate in rates if rate > 0}
    from melayer.interventions.methods import MethodSpec, parse_method

    specs = [m if isinstance(m, MethodSpec) else parse_method(str(m)) for m in methods]
    if len({m.label for m in specs}) != len(specs):
        raise MelayerError("--method: the same method is given twice")
    calibration = calibration_for(lm, the_task, samples, me_layer) if specs else None
    bound: dict[str, Any] = {}
    for i, m in enumerate(specs, 1):
        with status(f"binding method {i}/{len(specs)}: {plain(m.label)} (calibrated methods run the calibration prompts)"
                    if progress else None):
            bound[m.label] = m.bind(lm, calibration)

    out_dir = Path(output) if output is not None else None
    runs: dict[float, EvalResult] = {}
    for rate in rates:
        runs[rate] = run(lm, the_task, limit=limit, batch_size=batch_size,
                         output=out_dir / rate_dir(rate) if out_dir else None, max_new_tokens=max_new_tokens,
                         chat=chat, intervention=masks.get(rate), overwrite=overwrite,
                         progress=progress, samples=samples)

    method_runs = {label: run(lm, the_task, limit=limit, batch_size=batch_size,
                              output=out_dir / method_dir(label) if out_dir else None, max_new_tokens=max_new_tokens,
                              chat=chat, intervention=iv, overwrite=overwrite, progress=progress, samples=samples)
                   for label, iv in bound.items()}

    base = runs[0.0]
    prompts = [the_task.sink_text(s) for s in samples[:SINK_PROMPTS]]
    sink_note = None if sinks else "not requested"
    if sink_note is None:
        sink_note = sinks_available()
    sink_rates: dict[float, float | None] = {}
    sink_skipped = 0
    if sink_note is None:
        try:
            for rate in rates:
                sink_rates[rate], sink_skipped = _sinks(lm, prompts, masks.get(rate))
            for label, iv in bound.items():
                sink_rates[label], _ = _sinks(lm, prompts, iv)  # type: ignore[index]
        except MelayerError as exc:  # e.g. every task prompt is too short for a meaningful sink score
            sink_rates, sink_note = {}, f"not measured: {exc}"

    rows = []
    for rate in rates:
        res = runs[rate]
        if res.ids() != base.ids():
            raise MelayerError("internal error: the rates were evaluated on different samples")
        row: dict[str, Any] = {"rate": rate, "output": res.output, "metrics": {}}
        wm = res.intervention_after or (res.settings.get("intervention") or None)
        if wm:
            row["wemask"] = {k: wm.get(k) for k in ("k", "select", "gamma", "layers", "me_layer", "rule")}
        else:
            row["wemask"] = {"k": 0, "rule": "baseline (no intervention)"}
        row["metrics"] = paired_metrics(base, res, n_boot, seed) if rate != 0 else dict(res.metrics)
        if sink_rates:
            row["sink_rate"] = sink_rates[rate]
        rows.append(row)

    method_rows = []
    for label, res in method_runs.items():
        if res.ids() != base.ids():
            raise MelayerError("internal error: the methods were evaluated on different samples")
        row = {"method": label, "output": res.output, "metrics": paired_metrics(base, res, n_boot, seed),
               "intervention": res.intervention_after or res.settings.get("intervention")}
        if sink_rates:
            row["sink_rate"] = sink_rates.get(label)  # type: ignore[call-overload]
        method_rows.append(row)
    adjust_table([*rows, *method_rows])
    massive = None
    me_for_massive = me_layer if me_layer is not None else (calibration.me_layer if calibration else None)
    if me_for_massive is not None:
        conditions = {**{f"wemask:rate={r:g}": masks.get(r) for r in rates if r > 0}, **bound}
        massive = massive_downstream(lm, prompts, me_for_massive, conditions)
        for row in rows:
            if row["rate"] > 0:
                row["massive_downstream"] = massive["relative"].get(f"wemask:rate={row['rate']:g}")
        for row in method_rows:
            row["massive_downstream"] = massive["relative"].get(row["method"])

    settings = {k: base.settings[k] for k in ("task_options", "chat", "max_new_tokens", "prompt_format", "dtype",
                                                "batch_size", "limit")}
    settings.update({"n_samples": base.n_samples, "bootstrap": {"resamples": n_boot, "seed": seed,
                                                                 "level": 0.95, "paired": True},
                     "mcnemar": "exact two-sided binomial test on discordant pairs (scipy.stats.binomtest)"})
    if me_layer is None and me_for_massive is not None:  # found by the methods' calibration, not given
        source = "scan (the methods' calibration)"
    result = CompareResult(
        task=the_task.name, model=lm.name, rates=rates, me_layer=me_for_massive, me_layer_source=source,
        select=select,
        gamma=gamma, layers=layer_list if layer_list is not None else (
            list(range(me_layer + 1, lm.num_layers)) if me_layer is not None else None),
        rows=rows, settings=settings,
        sinks={"epsilon": SINK_EPSILON, "prompts": len(prompts), "prompts_skipped_too_short": sink_skipped,
               "source": "the first task prompts (as the model sees them, without chat template)", "note": sink_note,
               "rates": {(f"{r:g}" if isinstance(r, float) else r): v for r, v in sink_rates.items()} if sink_rates else None},
        runs=runs, output=str(out_dir) if out_dir else None, elapsed_s=time.time() - t0, methods=method_rows,
        calibration=calibration.to_dict() if calibration else None, massive=massive)
    if out_dir is not None:
        from melayer.util.io import write_json

        write_json(out_dir / "compare.json", result.to_dict())
    return result


def paired_metrics(base: EvalResult, res: EvalResult, n_boot: int, seed: int) -> dict[str, Any]:
    """Per metric: value, CI, the paired difference to ``base`` with its bootstrap CI, McNemar for 0/1 metrics."""
    out = {}
    for m in res.metric_specs:
        entry = dict(res.metrics[m.name])
        entry["vs_baseline"] = paired_bootstrap(m.kind, base.values(m.name), res.values(m.name), n_boot=n_boot,
                                                seed=seed)
        if m.binary:
            entry["mcnemar"] = mcnemar(outcomes(m.kind, base.values(m.name)), outcomes(m.kind, res.values(m.name)))
        out[m.name] = entry
    return out


def adjust_table(rows: list[dict[str, Any]]) -> None:
    """Benjamini-Hochberg over every McNemar p of the table, written next to each as ``p_bh``."""
    from scipy.stats import false_discovery_control

    tests = [m["mcnemar"] for r in rows for m in r["metrics"].values() if isinstance(m, dict) and m.get("mcnemar")]
    if tests:
        for t, q in zip(tests, false_discovery_control([t["p"] for t in tests], method="bh")):
            t["p_bh"] = float(q)


def method_dir(label: str) -> str:
    """``method_act``, ``method_wemask_before-rate=0.01``: the label with only safe characters."""
    import re

    return "method_" + re.sub(r"[^A-Za-z0-9_.=-]", "-", label)


def calibration_for(lm: LM, task: Any, evaluated: Sequence[Any], me_layer: int | None) -> Any:
    """Calibration prompts never evaluated: the task's last items outside the evaluated ones, else the shipped
    prompts."""
    from melayer.interventions.methods import CALIBRATION_PROMPTS, Calibration

    seen = {s.id for s in evaluated}
    rest = [s for s in task.load(None, lm=lm) if s.id not in seen][-CALIBRATION_PROMPTS:]
    if len(rest) < CALIBRATION_PROMPTS // 2:
        return Calibration(lm, me_layer=me_layer)
    return Calibration(lm, [task.sink_text(s) for s in rest], me_layer=me_layer, ids=[s.id for s in rest],
                       source=f"the last {len(rest)} {task.name} items outside the evaluated ones")


def massive_downstream(lm: LM, prompts: Sequence[str], me_layer: int, conditions: dict[str, Any]) -> dict[str, Any]:
    """Largest |a| on the massive dims in the layers after the ME layer (real tokens of ``prompts``), unmodified and
    under each condition; ``relative`` = condition / unmodified."""
    import torch

    from melayer.analysis.me_layer import massive_dims_at
    from melayer.analysis.scan import scan
    from melayer.capture import Hooks, encode, position_ids, read_site

    dims, _ = massive_dims_at(scan(lm, None, progress=False), me_layer)
    layers = list(range(me_layer + 1, lm.num_layers))
    if not dims or not layers or not prompts:
        return {"dims": dims, "layers": layers, "unmodified": None, "relative": {}, "note": "nothing to measure"}

    @torch.no_grad()
    def peak(iv: Any) -> float:
        best = 0.0
        for i in range(0, len(prompts), 8):
            batch = encode(lm, list(prompts[i: i + 8]), max_tokens=128)
            mask = batch["attention_mask"].to(lm.device)
            found: list[float] = []
            with Hooks() as hooks, (iv if iv is not None else contextlib.nullcontext()):
                def keep(x: torch.Tensor, found: list[float] = found, mask: torch.Tensor = mask) -> None:
                    found.append(float((x[..., dims].abs().float() * mask[..., None].to(x.device)).max()))

                for layer in layers:
                    read_site(hooks, lm, layer, "resid_out", keep)
                lm.model(input_ids=batch["input_ids"].to(lm.device), attention_mask=mask,
                         position_ids=position_ids(mask), use_cache=False, logits_to_keep=1)
            best = max([best, *found])
        return best

    base = peak(None)
    values = {label: peak(iv) for label, iv in conditions.items()}
    return {"dims": dims, "layers": layers, "unmodified": base, "absolute": values,
            "relative": {k: (v / base if base else None) for k, v in values.items()},
            "rule": "largest |a| on the massive dims (ME layer output) over the real tokens of the sink prompts, in "
                    "every layer after the ME layer, under the condition / unmodified"}
