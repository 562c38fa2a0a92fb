"""Load a fine-tuned adapter onto its base model and re-apply the WeMask it was trained with.

``melayer finetune`` writes the peft adapter, ``wemask.json`` and ``finetune.json`` into one directory.
:func:`attach_adapter` merges the adapter into the loaded base model and, unless told otherwise, applies the
saved mask (persistent hooks), so a WeMask-trained adapter is never evaluated without its mask by accident. An
adapter trained on another base model is refused.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

from melayer.interventions.wemask import WeMask
from melayer.models.loading import LM
from melayer.models.loading import load as load_base
from melayer.util.errors import MelayerError


def read_adapter_dir(path: str | Path) -> tuple[Path, dict[str, Any], dict[str, Any] | None]:
    """(directory, finetune.json, wemask.json or None) after checking the directory is a melayer adapter."""
    d = Path(path).expanduser()
    if not d.is_dir():
        raise MelayerError(f"--adapter {d}: not a directory")
    if not (d / "adapter_config.json").is_file():
        if (d / "finetune.json").is_file():
            raise MelayerError(f"--adapter {d}: a full fine-tune (no adapter); load it as the model: --model {d}")
        raise MelayerError(f"--adapter {d}: no adapter_config.json (not a fine-tuning output directory)")
    info: dict[str, Any] = {}
    if (d / "finetune.json").is_file():
        info = json.loads((d / "finetune.json").read_text())
    mask = json.loads((d / "wemask.json").read_text()) if (d / "wemask.json").is_file() else None
    return d, info, mask


def _check_base(lm: LM, d: Path, info: dict[str, Any], mask: dict[str, Any] | None) -> None:
    trained_on = info.get("model")
    if trained_on is not None and trained_on != lm.name:
        raise MelayerError(f"--adapter {d} was trained on {trained_on}, not on {lm.name}: load its base model")
    if mask and mask.get("hidden_size") not in (None, lm.hidden_size):
        raise MelayerError(f"--adapter {d}: trained on a model of hidden size {mask['hidden_size']}, "
                           f"this one has {lm.hidden_size}")


def saved_mask(lm: LM, path: str | Path) -> WeMask | None:
    """The WeMask an adapter was trained with, bound to ``lm`` and not applied (None when trained without)."""
    _, _, saved = read_adapter_dir(path)
    if not saved or not saved.get("rate"):
        return None
    return WeMask(lm, saved["rate"], layers=saved["layers"], select=saved.get("select", "activation"),
                  gamma=saved.get("gamma", 1.0), token=saved.get("token", "first"), me_layer=saved.get("me_layer"),
                  dims=saved.get("fixed_dims"), offset=saved.get("offset") or 0)  # a control's fixed dims / token


def attach_adapter(lm: LM, path: str | Path, mask: bool = True) -> WeMask | None:
    """Merge the adapter at ``path`` into ``lm.model`` (in place) and apply its saved WeMask (returned, already
    applied; ``.remove()`` takes it off). ``mask=False`` loads the adapter alone."""
    from peft import PeftModel

    d, info, saved = read_adapter_dir(path)
    _check_base(lm, d, info, saved)
    try:
        merged = PeftModel.from_pretrained(lm.model, str(d)).merge_and_unload()
    except (ValueError, RuntimeError, KeyError) as exc:
        raise MelayerError(f"--adapter {d}: does not fit {lm.name} ({' '.join(str(exc).split())[:200]})") from None
    merged.eval()
    lm.model = merged
    wm = saved_mask(lm, d) if mask else None
    return wm.apply() if wm is not None else None


def load(spec: str | None = None, *, adapter: str | Path | None = None, adapter_mask: bool = True,
         **options: Any) -> LM:
    """Load a causal language model (``melayer.load``; the ``--model`` option of every command).

    The options besides ``adapter`` and ``adapter_mask`` are those of :func:`melayer.models.loading.load`, which
    loads the model; they are spelled out in this function's signature (``help()``, ``inspect.signature``).

    Args:
        spec: ``gemma-3-270m`` (default) or ``smollm2-135m`` (the embedded models), a local Hugging Face
            directory, a ``.gguf`` file (converted once and cached) or a hub id.
        adapter: a ``melayer finetune`` output directory: its adapter is merged into the model. An adapter
            trained on another base model is refused.
        adapter_mask: re-apply the WeMask the adapter was trained with (kept in ``lm.adapter_wemask``; its
            ``remove()`` takes it off).
        **options: the options of :func:`melayer.models.loading.load`, below.

    Keyword Args:
        dtype (str | torch.dtype): ``"float32"`` (default), ``"bfloat16"``, ``"float16"`` or a ``torch.dtype``.
        device (str | None): a device to move the model to (``"cuda:0"``); not with ``device_map``.
        arch (Any): an architecture-map override: a mapped family name, a dict of role -> module path, a JSON file
            or an :class:`~melayer.models.archmap.ArchSpec`.
        progress (bool): show progress bars (GGUF conversion).
        device_map (str | dict | None): split the model with accelerate: ``"auto"``, ``"balanced"``,
            ``"sequential"``, a device, or a dict of module -> device (``"cpu"``/``"disk"`` entries offload).
        max_memory (str | dict | None): memory per device for the split, ``{0: "20GiB", "cpu": "64GiB"}`` or
            ``"0=20GiB,cpu=64GiB"`` (implies ``device_map="auto"``).
        offload_folder (str | Path | None): where layers offloaded to disk go (default: a fresh folder under the
            cache, removed with the model).
        trust_remote_code (bool): run a hub or directory model's own Python code (transformers' option); off
            unless asked.
        overflow_guard (bool): install the removable overflow guard (``lm.overflow_guard``), which turns inf/nan
            in a layer into one clear error.

    Returns:
        The loaded model, its tokenizer and its architecture map, as an :class:`~melayer.models.loading.LM`.

    Raises:
        MelayerError: the model cannot be found, read or mapped, or the adapter does not fit it.
    """
    if adapter is not None:
        read_adapter_dir(adapter)  # a bad adapter fails before the model is loaded
    lm = load_base(spec, **options)
    if adapter is not None:
        lm.adapter_wemask = attach_adapter(lm, adapter, mask=adapter_mask)
    return lm


def _signature() -> inspect.Signature:
    """``load``'s signature: the models layer's ``load`` (every option, so none can go missing here) plus the
    adapter's two."""
    own = inspect.signature(load).parameters
    base = inspect.signature(load_base)
    params = [*base.parameters.values(), own["adapter"], own["adapter_mask"]]
    return base.replace(parameters=params)


load.__signature__ = _signature()  # type: ignore[attr-defined]
