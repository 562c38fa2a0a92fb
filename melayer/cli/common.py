"""Options and the steps every command shares: check the output target (before loading anything), load the
model, run, write the JSON atomically, render (summary + plots). Commands are thin shells over the Python API."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import typing
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional, cast

import typer

from melayer.util.errors import MelayerError
from melayer.util.io import MAX_PROMPT_CHARS, MAX_PROMPT_TEXT, MAX_PROMPTS

if TYPE_CHECKING:
    from melayer.models.loading import DType


class Dtype(StrEnum):
    """Precision of the weights and activations."""

    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class Select(StrEnum):
    """How WeMask picks the dims it masks."""

    activation = "activation"
    weight = "weight"


class Chat(StrEnum):
    """Whether prompts are wrapped in the tokenizer's chat template."""

    auto = "auto"
    on = "on"
    off = "off"


def dtype_name(dtype: Dtype | str) -> DType:
    """--dtype as the Python API names it (the choices are the API's names)."""
    return cast("DType", str(dtype))


def chat_flag(chat: Chat | str) -> bool | None:
    """--chat as the Python API takes it: None (auto: when the tokenizer has a template), True or False."""
    return {"auto": None, "on": True, "off": False}[str(chat)]


ModelOpt = Annotated[Optional[str], typer.Option("--model", "-m", help="gemma-3-270m (default), smollm2-135m, a HF dir, a .gguf file or a hub id")]
PromptOpt = Annotated[Optional[str], typer.Option("--prompt", "-p", help=f"a single prompt (at most {MAX_PROMPT_CHARS:,} characters)")]
PromptsOpt = Annotated[Optional[Path], typer.Option("--prompts", help=f"a text file, one prompt per line (at most {MAX_PROMPTS:,} prompts of up to {MAX_PROMPT_CHARS:,} characters, {MAX_PROMPT_TEXT // 2**20} MiB in all; read a line at a time)")]
OutputOpt = Annotated[Path, typer.Option("--output", "-o", help="output directory")]
DtypeOpt = Annotated[Dtype, typer.Option("--dtype", help="precision of the weights and activations")]
ArchOpt = Annotated[Optional[str], typer.Option("--arch", help="architecture-map override: a mapped family name or a JSON file of role -> module path")]
DeviceMapOpt = Annotated[Optional[str], typer.Option("--device-map", help="split the model with accelerate: auto, balanced, sequential, a device (cuda:0) or a JSON file of module -> device ('cpu'/'disk' offload)")]
MaxMemoryOpt = Annotated[Optional[str], typer.Option("--max-memory", help="memory per device for the device map, e.g. 0=20GiB,1=20GiB,cpu=64GiB (implies --device-map auto)")]
NPromptsOpt = Annotated[Optional[int], typer.Option("--n-prompts", help="use the first N prompts (0 = all)")]
BatchOpt = Annotated[int, typer.Option("--batch-size", "-b", help="prompts per forward pass")]
AdapterOpt = Annotated[Optional[Path], typer.Option("--adapter", help="a melayer finetune output directory: its adapter is merged into --model and the WeMask it was trained with is re-applied")]
AdapterMaskOpt = Annotated[bool, typer.Option("--adapter-mask/--no-adapter-mask", help="re-apply the adapter's saved WeMask (default) or not")]
AutoBatchOpt = Annotated[Optional[int], typer.Option(
    "--batch-size", "-b", help="at most this many prompts per forward pass (default: length-sorted batches picked for the device)")]
# WeMask and chat options: one spelling and one help text for every command that takes them
SelectOpt = Annotated[Select, typer.Option("--select", help="WeMask dims by activation (|value| of the massive token's attention input) or weight (|pre-attention norm gain|)")]
LayersOpt = Annotated[Optional[str], typer.Option("--layers", help="WeMask layers, e.g. 4-17 or 4,5,6 (default: every layer after the ME layer)")]
MeLayerOpt = Annotated[Optional[int], typer.Option("--me-layer", help="the ME layer (default: found with one scan)")]
GammaOpt = Annotated[float, typer.Option("--gamma", help="WeMask strength: masked dims are scaled by 1 - gamma (1 = zeroed)")]
ChatOpt = Annotated[Chat, typer.Option("--chat", help="chat template: auto (when the tokenizer has one; for eval, generation tasks only), on or off")]
PlotsOpt = Annotated[bool, typer.Option(help="write PNG plots")]
ReportOpt = Annotated[bool, typer.Option("--report", help="also (re)write DIR/report.html from every melayer output in DIR")]


@dataclass
class Given:
    """The options several commands share, each defined once (flag, help text, default). A command made with
    :func:`shared_options` takes the ones its layout names and receives them in one ``Given`` (the others keep
    these defaults)."""

    model: ModelOpt = None
    prompt: PromptOpt = None
    prompts: PromptsOpt = None
    n_prompts_: NPromptsOpt = None
    batch_size: AutoBatchOpt = None
    dtype: DtypeOpt = Dtype.float32
    arch: ArchOpt = None
    device_map: DeviceMapOpt = None
    max_memory: MaxMemoryOpt = None
    select: SelectOpt = Select.activation
    layers: LayersOpt = None
    me_layer: MeLayerOpt = None
    gamma: GammaOpt = 1.0
    chat: ChatOpt = Chat.auto
    adapter: AdapterOpt = None
    use_adapter_mask: AdapterMaskOpt = True
    plots: PlotsOpt = True
    report: ReportOpt = False

    def texts(self, default_n: int | None) -> tuple[int | None, list[str] | None]:
        """--n-prompts (None: ``default_n``; 0: all) and the prompts of --prompt / --prompts, that many at most."""
        n = n_prompts(self.n_prompts_, default_n)
        return n, prompts_from(self.prompt, self.prompts, limit=n)

    def load(self, adapter: Path | None = None) -> Any:
        """The model of --model, --dtype, --arch, --device-map and --max-memory (with ``adapter`` merged)."""
        return load_model(self.model, self.dtype, self.arch, adapter, self.device_map, self.max_memory)


def shared_options(layout: str, given: type[Given] = Given) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """A command's parameters in the order of ``layout`` (names, space-separated): the function's own, from its
    signature after the first parameter, and the shared ones, fields of ``given``, which the function receives
    together as that first parameter. So every command spells a shared option, its help and its default the
    same way, and says only where it goes."""

    def build(func: Callable[..., None]) -> Callable[..., None]:
        own = dict(list(inspect.signature(func).parameters.items())[1:])
        hints = typing.get_type_hints(func, include_extras=True)
        defaults = {f.name: f.default for f in dataclasses.fields(given)}
        shared = typing.get_type_hints(given, include_extras=True)
        params: list[inspect.Parameter] = []
        taken: list[str] = []
        for name in layout.split():
            if name in own:
                params.append(own.pop(name).replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=hints[name]))
            elif name in defaults:
                params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=shared[name],
                                                default=defaults[name]))
                taken.append(name)
            else:
                raise TypeError(f"{func.__name__}: {name!r} is neither its parameter nor a shared option")
        if own:
            raise TypeError(f"{func.__name__}: its layout leaves out {', '.join(own)}")

        @functools.wraps(func)
        def command(**kwargs: Any) -> None:
            func(given(**{name: kwargs.pop(name) for name in taken}), **kwargs)

        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command

    return build


def prompts_from(prompt: str | None, prompts: Path | None, limit: int | None = None) -> list[str] | None:
    """--prompt or --prompts (only the first ``limit`` prompts of the file are read, when given)."""
    from melayer.util.io import check_prompt_size, read_prompts

    if prompt is not None and prompts is not None:
        raise MelayerError("give --prompt or --prompts, not both")
    if prompt is not None:
        if not prompt.strip():
            raise MelayerError("empty prompt: --prompt must contain text")
        return [check_prompt_size(prompt, "--prompt")]
    if prompts is not None:
        return read_prompts(str(prompts), limit)
    return None


def n_prompts(value: int | None, default: int | None) -> int | None:
    """--n-prompts: None -> the command's default, 0 -> all."""
    if value is None:
        return default
    if value < 0:
        raise MelayerError("--n-prompts must be >= 0")
    return value or None


def check_mask_options(wemask: float | None, layers: str | None, me_layer: int | None) -> None:
    """--layers / --me-layer choose where WeMask acts: without --wemask they would be silently ignored."""
    if wemask is None and (layers is not None or me_layer is not None):
        raise MelayerError("--layers/--me-layer only apply with --wemask RATE")


def check_output(path: Path) -> Path:
    """Fail before any work if --output cannot become a directory (it is created when results are written)."""
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        what = "exists and is not a directory" if existing == path else f"is inside {existing}, which is a file"
        raise MelayerError(f"--output {path} {what}")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise MelayerError(f"--output {path}: {existing} is not writable")
    return path


def check_output_file(path: Path) -> Path:
    """Like :func:`check_output` for a single output file."""
    if path.exists() and path.is_dir():
        raise MelayerError(f"--output {path} is a directory; give a file name")
    check_output(path.parent)
    return path


def load_model(model: str | None, dtype: str, arch: str | None, adapter: Path | None = None,
               device_map: str | None = None, max_memory: str | None = None) -> Any:
    """Load ``--model`` (and merge ``--adapter``; its saved mask is returned by :func:`adapter_mask`), split
    across devices by ``--device-map`` / ``--max-memory``."""
    from melayer.interventions.adapter import load

    return load(model, dtype=dtype, arch=arch, adapter=adapter, adapter_mask=False, device_map=device_map,
                max_memory=max_memory)


def adapter_mask(lm: Any, adapter: Path | None, use: bool, wemask: float | None) -> Any:
    """The WeMask ``--adapter`` was trained with (not applied), unless ``--no-adapter-mask``; refuses a second
    mask from ``--wemask``."""
    if adapter is None or not use:
        return None
    from melayer.interventions.adapter import saved_mask

    mask = saved_mask(lm, adapter)
    if mask is not None and wemask is not None:
        raise MelayerError("--adapter re-applies the WeMask it was trained with; drop --wemask or add "
                           "--no-adapter-mask")
    return mask


def finish(data: dict[str, Any], output: Path, kind: str, plots: bool = True, write: bool = True,
           announce_plots: bool = False, report: bool = False) -> None:
    """Write ``output/<kind>.json`` atomically (unless the API already did), print the kind's summary, draw its
    figures (see :data:`melayer.reporting.results.KINDS`), refresh ``output/report.html`` if asked, and say
    what was written. The results are on disk before anything is rendered, and the summary is printed from a
    copy whose strings cannot carry console markup or terminal controls."""
    from melayer.reporting.results import KINDS
    from melayer.util.console import console_safe
    from melayer.util.io import write_json

    spec = KINDS[kind]
    if write:
        write_json(output / spec.file, data)
    spec.print_summary(console_safe(data))
    drawn = spec.draw(data, output) if plots else []
    extra = "".join(f" and {p}" for p in drawn) if announce_plots else ""
    typer.echo(f"wrote {output / spec.file}{extra}")
    if report:
        from melayer.reporting.page import html

        html(output, output=output / "report.html")
        typer.echo(f"wrote {output / 'report.html'}")


def run_analysis(kind: str, output: Path, given: Given, run: Callable[[Any], Any]) -> dict[str, Any]:
    """check output -> load -> run (returns a result with ``to_dict()``) -> summary -> write -> figures (-> report)."""
    check_output(output)
    data = run(given.load()).to_dict()
    finish(data, output, kind, given.plots, report=given.report)
    return data
