"""``melayer.eval.run``: batched, resumable evaluation of one task -> DIR/samples.jsonl + DIR/eval.json.

Resume: every finished sample is appended (fsync'd) to ``samples.jsonl`` with a key of the settings that
determine its result. On start the file is read (a torn last line from a killed run is dropped), the key is
checked (a mismatch is a :class:`MelayerError` asking for a new ``--output`` or ``--overwrite``), and samples
already done are skipped, so no sample is lost or repeated. The batches are planned over all the run's samples
(the plan an uninterrupted run makes) and a resumed run reruns only the batches that still miss a sample, so
every sample is computed in the same batch, with the same padding, as without the interruption: the records
and metrics are bit-identical. ``limit`` and ``batch_size`` are not part of the key: a later run may extend an
earlier one to more samples (the samples already there keep the results of the plan they ran in). The model
enters the key by its identity (:func:`melayer.models.fingerprint.fingerprint`: config and weights), not by its path.

Ctrl-C during a run with an output directory raises :class:`melayer.util.errors.Interrupted`, which says what is
saved; the CLI turns it into one line with the command that resumes the run.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from melayer.capture.batching import GENERATE, plan_batches
from melayer.eval import engine as E
from melayer.eval.stats import Metric, aggregate, bootstrap_ci
from melayer.eval.tasks import RunContext, Task, get_task
from melayer.models.chat import ChatSetting
from melayer.models.fingerprint import fingerprint
from melayer.models.loading import LM
from melayer.util.console import track, warn
from melayer.util.errors import Interrupted, MelayerError
from melayer.util.io import append_jsonl, read_jsonl, scan_jsonl, write_atomic, write_json
from melayer.util.results import Result, read_json

SCHEMA = "melayer.eval/1"
SAMPLES = "samples.jsonl"
SUMMARY = "eval.json"


def describe_intervention(intervention: E.Intervention) -> dict[str, Any] | None:
    """The intervention's settings: ``.to_dict()`` of the instance (or of what a factory returns, not entered)."""
    if intervention is None:
        return None
    to_dict = getattr(intervention, "to_dict", None)
    if not callable(to_dict) and not hasattr(intervention, "__enter__"):
        to_dict = getattr(intervention(), "to_dict", None)
    if callable(to_dict):
        return to_dict()
    return {"intervention": getattr(intervention, "__name__", repr(intervention))}


@dataclass
class EvalResult(Result):
    """Summary of one task run (``records`` holds the per-sample records, in sample order); ``to_dict()`` is
    what ``eval.json`` holds. ``EvalResult.load(path)`` reads it back with the records of the
    ``samples.jsonl`` next to it."""

    kind = "eval"

    task: str
    model: str
    settings: dict[str, Any]
    metrics: dict[str, dict[str, Any]]
    primary: str
    n_samples: int
    records: list[dict[str, Any]] = field(repr=False, default_factory=list)
    metric_specs: tuple[Metric, ...] = ()
    output: str | None = None
    elapsed_s: float = 0.0
    intervention_after: dict[str, Any] | None = None
    breakdown: dict[str, Any] | None = None
    truncated_saved: dict[str, Any] | None = field(default=None, repr=False)  # read from a file without records

    def values(self, metric: str) -> list[Any]:
        """Every sample's value of one metric, in the records' order.

        Args:
            metric: a metric name of the task (``EvalResult.metrics`` keys).

        Returns:
            One value per sample record.
        """
        return [r["metrics"][metric] for r in self.records]

    def ids(self) -> list[str]:
        """The sample ids, in the records' order.

        Returns:
            One id per sample record.
        """
        return [r["id"] for r in self.records]

    def truncated(self) -> dict[str, Any]:
        """Samples whose input was cut from the left to fit the model's positions (lm-eval's rule).

        Returns:
            ``{"samples", "max_tokens_cut", "rule"}``.
        """
        if not self.records and self.truncated_saved is not None:
            return self.truncated_saved
        cut = [r["truncated_tokens"] for r in self.records if r.get("truncated_tokens")]
        return {"samples": len(cut), "max_tokens_cut": max(cut, default=0),
                "rule": "inputs longer than the model's positions lose their start (log-likelihood: the last "
                        "positions + 1 tokens of context + continuation are kept; generation: the prompt keeps "
                        "the last positions - max_new_tokens tokens), as lm-eval does"}

    def to_dict(self) -> dict[str, Any]:
        """The result as ``eval.json`` holds it (the per-sample records go to ``samples.jsonl``).

        Returns:
            JSON-ready data: the task, model, settings, metrics with their intervals and the sample count.
        """
        return {
            "schema": SCHEMA,
            "task": self.task,
            "model": self.model,
            "settings": self.settings,
            "primary_metric": self.primary,
            "metrics": self.metrics,
            "breakdown": self.breakdown,
            "metric_kinds": {m.name: m.to_dict() for m in self.metric_specs},
            "n_samples": self.n_samples,
            "truncated": self.truncated(),
            "intervention_after_run": self.intervention_after,
            "elapsed_s": round(self.elapsed_s, 2),
            "output": self.output,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], records: list[dict[str, Any]] | None = None) -> EvalResult:
        """The result an ``eval.json`` holds.

        Args:
            data: a loaded ``eval.json`` (what :meth:`to_dict` returned).
            records: its per-sample records (``samples.jsonl``), if any.

        Returns:
            The evaluation result.
        """
        return cls(task=data["task"], model=data["model"], settings=data["settings"], metrics=data["metrics"],
                   breakdown=data.get("breakdown"), primary=data["primary_metric"], n_samples=data["n_samples"],
                   records=list(records or []),
                   metric_specs=tuple(Metric(**m) for m in data["metric_kinds"].values()), output=data["output"],
                   elapsed_s=data["elapsed_s"], intervention_after=data["intervention_after_run"],
                   truncated_saved=data["truncated"])

    @classmethod
    def load(cls, path: str | Path) -> EvalResult:
        """Read an ``eval.json`` (and the ``samples.jsonl`` beside it, when there) back into the result.

        Args:
            path: the ``eval.json`` file.

        Returns:
            The evaluation result, with its per-sample records when ``samples.jsonl`` is there.
        """
        data = cls.check(read_json(path), str(path))
        samples = Path(path).parent / SAMPLES
        return cls.from_dict(data, read_jsonl(samples) if samples.is_file() else None)


def _key(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _existing(path: Path) -> list[dict[str, Any]]:
    """Records already on disk. Unreadable lines (not UTF-8 or JSON, not an object, no ``id``) are moved to
    ``samples.jsonl.bad`` with a warning, and every valid record around them is kept; a torn last line (killed
    mid-write) is removed from the file."""
    records, bad, torn = scan_jsonl(path, require="id")
    if bad:
        aside = path.with_name(path.name + ".bad")
        before = aside.read_bytes() if aside.is_file() and not aside.is_symlink() else b""
        write_atomic(aside, lambda p: p.write_bytes(before + b"".join(raw + b"\n" for _, raw in bad)))
        where = ", ".join(str(n) for n, _ in bad[:5]) + (", ..." if len(bad) > 5 else "")
        warn(f"{path}: {len(bad)} unreadable line(s) (line {where}) set aside in {aside}; the {len(records)} valid "
             "records are kept and the missing samples will be recomputed")
    if bad or torn:
        good = "".join(json.dumps(r) + "\n" for r in records)
        write_atomic(path, lambda p: p.write_text(good))
    return records


def summarize(task: Task, records: list[dict[str, Any]], n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for m in task.metrics:
        vals = [r["metrics"][m.name] for r in records]
        if not vals:
            out[m.name] = {"value": None, "ci95": [None, None], "n": 0}
            continue
        lo, hi = bootstrap_ci(m.kind, vals, n_boot=n_boot, seed=seed)
        out[m.name] = {"value": aggregate(m.kind, vals), "ci95": [lo, hi], "n": len(vals)}
    return out


def _instance(intervention: E.Intervention) -> Any:
    """One context manager for the whole run: an instance as given, a factory called once."""
    if intervention is None or hasattr(intervention, "__enter__"):
        return intervention
    return intervention()


def check_run_args(limit: int | None, batch_size: int, max_new_tokens: int | None) -> None:
    """One-line errors for run settings (the CLI calls this before loading a model)."""
    if limit is not None and limit < 1:
        raise MelayerError(f"--limit must be a positive number of samples (got {limit})")
    if batch_size < 1:
        raise MelayerError(f"--batch-size must be >= 1 (got {batch_size})")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise MelayerError(f"--max-new-tokens must be >= 1 (got {max_new_tokens})")

def run(
    lm: LM,
    task: str | Task,
    limit: int | None = None,
    batch_size: int = 8,
    output: str | Path | None = None,
    max_new_tokens: int | None = None,
    chat: ChatSetting = "auto",
    intervention: E.Intervention = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
    on_batch: Callable[[list[dict[str, Any]]], None] | None = None,
    samples: list[Any] | None = None,
    **task_options: Any,
) -> EvalResult:
    """Evaluate ``lm`` on one task, offline, resumably (``melayer eval``; ``melayer.evaluate``).

    See the module docstring for how a killed run resumes.

    Args:
        lm: the model.
        task: a task name (``melayer.eval.TASKS``) or a :class:`~melayer.eval.tasks.Task`.
        limit: use the first this many samples (None: all).
        batch_size: samples per forward pass.
        output: a directory for ``eval.json`` and ``samples.jsonl`` (None: nothing is written).
        max_new_tokens: the generation budget of generative tasks (None: the task's).
        chat: use the chat template: ``True``, ``False`` or ``"auto"`` (when the tokenizer has one).
        intervention: a re-enterable context manager applied around every model call (e.g.
            ``melayer.wemask(lm, 0.01, me_layer=3)``; a callable returning one is called once).
        overwrite: discard a previous run with other settings in ``output``.
        progress: show a progress bar.
        on_batch: called with each batch's new records after they are written.
        samples: overrides the task's own sample list (``task.load(limit)``).
        **task_options: the task's own options (e.g. ``num_fewshot``; ``melayer.eval.tasks`` lists them).

    Returns:
        The metrics with bootstrap intervals and the per-sample records, as an :class:`EvalResult`.

    Raises:
        MelayerError: an unknown task or option, a bad setting, or ``output`` holding another run.
    """
    t0 = time.time()
    check_run_args(limit, batch_size, max_new_tokens)
    task = get_task(task, **task_options)
    use_chat = task.uses_chat(lm, chat)
    if task.family != "generate":
        max_new_tokens = None
    else:
        max_new_tokens = int(max_new_tokens or task.default_max_new_tokens or 256)
    todo_all = samples if samples is not None else task.load(limit, lm=lm)
    if not todo_all:
        raise MelayerError(f"task {task.name}: no samples")
    ids = [s.id for s in todo_all]
    if len(set(ids)) != len(ids):
        raise MelayerError(f"task {task.name}: duplicate sample ids")

    wem = describe_intervention(intervention)
    out_dir = Path(output) if output is not None else None
    model_id = fingerprint(lm.model) if out_dir is not None else None  # only a resumable run needs it
    identity = {
        "task": task.name, "task_options": task.settings(), "model_fingerprint": model_id,
        "dtype": str(lm.dtype).replace("torch.", ""), "chat": use_chat, "max_new_tokens": max_new_tokens,
        "prompt_format": task.prompt_format(use_chat), "greedy": True,
        # the intervention's settings, without the model's display name (the fingerprint identifies the model)
        "intervention": {k: v for k, v in wem.items() if k != "model"} if wem else wem,
    }
    key = _key(identity)
    settings = {**identity, "intervention": wem, "model": lm.name, "source": getattr(lm, "source", ""),
                "batch_size": batch_size, "limit": limit, "settings_key": key, "description": task.description,
                "torch": torch.__version__}

    done: dict[str, dict[str, Any]] = {}
    samples_path = None
    if out_dir is not None:
        if out_dir.exists() and not out_dir.is_dir():
            raise MelayerError(f"--output {out_dir} exists and is not a directory")
        out_dir.mkdir(parents=True, exist_ok=True)
        samples_path = out_dir / SAMPLES
        if overwrite:
            samples_path.unlink(missing_ok=True)
            (out_dir / SUMMARY).unlink(missing_ok=True)
        for rec in _existing(samples_path):
            if rec.get("settings_key") != key and rec.get("model_fingerprint") not in (None, model_id):
                raise MelayerError(
                    f"{samples_path} was written by a different model (config or weights differ from "
                    f"{lm.name}'s, fingerprint {rec.get('model_fingerprint')} vs {model_id}); use a new --output or "
                    "--overwrite")
            if rec.get("settings_key") != key:
                raise MelayerError(
                    f"{samples_path} was written with different settings (task/model/prompt/chat/max_new_tokens/"
                    f"intervention); use a new --output or --overwrite")
            done.setdefault(rec["id"], rec)

    ctx = RunContext(chat=use_chat, max_new_tokens=max_new_tokens, intervention=_instance(intervention))
    # length-sorted batches (the shared planner; lengths estimated from the text): little padding per batch.
    # The plan covers every sample of the run, done or not, so a resumed run groups and pads each sample
    # exactly as an uninterrupted one; it runs only the batches with a sample missing (all of such a batch,
    # keeping only the missing samples' records).
    sizes = [task.size_hint(s) for s in todo_all]
    plan = [[todo_all[i] for i in idx] for idx in plan_batches(sizes, policy=GENERATE, max_batch=batch_size)]
    batches = [b for b in plan if any(s.id not in done for s in b)]
    n_done = sum(1 for i in ids if i in done)
    label = f"eval {task.name} ({n_done}/{len(todo_all)} samples already done; batches)"
    try:
        for batch in track(batches, label, total=len(batches), enabled=progress):
            new = [rec for rec in task.run_batch(lm, batch, ctx) if rec["id"] not in done]
            for rec in new:
                rec["settings_key"] = key
                rec["model_fingerprint"] = model_id
                if samples_path is not None:
                    append_jsonl(samples_path, rec)
                done[rec["id"]] = rec
            if on_batch is not None:
                on_batch(new)
    except KeyboardInterrupt:
        if samples_path is None:
            raise
        saved = {r.get("id") for r in read_jsonl(samples_path)} & set(ids)  # what is on disk (a torn line is not)
        raise Interrupted(f"{len(saved)}/{len(ids)} samples saved in {samples_path}", resumable=True) from None

    records = [done[i] for i in ids]
    after = None
    if ctx.intervention is not None and callable(getattr(ctx.intervention, "to_dict", None)):
        after = ctx.intervention.to_dict()  # type: ignore[union-attr]
    n_cut = sum(1 for r in records if r.get("truncated_tokens"))
    if n_cut:
        warn(f"{task.name}: {n_cut} of {len(records)} samples were cut from the left to fit {lm.name}'s "
             f"{lm.max_positions} positions (as lm-eval does; see 'truncated' in eval.json)")
    result = EvalResult(task=task.name, model=lm.name, settings=settings, metrics=summarize(task, records),
                        primary=task.metrics[0].name, n_samples=len(records), records=records,
                        metric_specs=task.metrics, output=str(out_dir) if out_dir else None,
                        elapsed_s=time.time() - t0, intervention_after=after, breakdown=task.breakdown(records))
    if out_dir is not None:
        write_json(out_dir / SUMMARY, result.to_dict())
    return result


def load_result(out_dir: str | Path) -> dict[str, Any]:
    """Read a finished run's eval.json."""
    path = Path(out_dir) / SUMMARY
    if not path.exists():
        raise MelayerError(f"no {SUMMARY} in {out_dir}")
    return json.loads(path.read_text())


__all__ = ["EvalResult", "load_result", "run", "summarize"]
