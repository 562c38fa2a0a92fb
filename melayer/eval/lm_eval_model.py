"""lm-evaluation-harness model type ``melayer``: any ``melayer.load`` spec, optionally under WeMask.

lm-eval 0.4.13 does not read the ``lm_eval.models`` entry-point group: its model registry only knows
the classes registered by modules that have been imported. Importing this module registers ``melayer``.
Three ways to use it:

* shell: ``melayer-lm-eval --model melayer --model_args pretrained=gemma-3-270m,wemask=0.01 --tasks ...``
  (this console script imports this module, then runs lm-eval's own CLI unchanged; ``python -m
  melayer.eval.lm_eval_model ...`` does the same without the installed script);
* Python: ``import melayer.eval.lm_eval_model`` then ``lm_eval.simple_evaluate(model="melayer", ...)``;
* Python: ``lm_eval.simple_evaluate(model=MelayerLM(pretrained=..., wemask=0.01), ...)``.

model_args: ``pretrained=SPEC`` (default gemma-3-270m), ``wemask=RATE``, ``wemask_layers=4-17`` (ranges; several
items separated by ``;`` or ``+`` because lm-eval splits model_args on commas), ``wemask_select=activation|weight``,
``wemask_gamma=1.0``, ``wemask_me_layer=N`` (skip the ME-layer scan), ``wemask_token=first|massive``,
``method=NAME:key=value;key=value`` (any registered intervention instead of wemask=, e.g. ``method=act``),
``dtype=float32``, ``arch=...``; ``peft=DIR`` (a ``melayer finetune`` output: the adapter is merged and its saved
WeMask re-applied; ``peft_mask=false`` loads the adapter without it); every other HFLM argument (``batch_size``, ``max_length``, ``add_bos_token``...)
is passed through to lm-eval's ``HFLM``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from lm_eval.api.registry import model_registry
from lm_eval.models.huggingface import HFLM

log = logging.getLogger(__name__)


class MelayerLM(HFLM):
    """lm-eval's ``HFLM`` around a model loaded by :func:`melayer.load`, with WeMask applied persistently."""

    def __init__(
        self,
        pretrained: Any = None,
        wemask: float | None = None,
        wemask_layers: Any = None,
        wemask_select: str = "activation",
        wemask_gamma: float = 1.0,
        wemask_me_layer: int | None = None,
        wemask_token: str = "first",
        dtype: str = "float32",
        arch: str | None = None,
        device: str | None = None,
        peft: str | None = None,
        peft_mask: Any = True,
        method: str | None = None,
        **kwargs: Any,
    ) -> None:
        from melayer.interventions.adapter import load
        from melayer.interventions.wemask import WeMask, select_rule, token_rule
        from melayer.models.loading import LM
        from melayer.util.errors import MelayerError

        if isinstance(pretrained, LM):
            lm = pretrained
        else:
            if pretrained is not None and not isinstance(pretrained, str):
                raise MelayerError("model 'melayer' needs pretrained=SPEC (a melayer.load spec) or a melayer LM")
            use_mask = str(peft_mask).lower() not in ("false", "0", "no")
            lm = load(pretrained, dtype=dtype, arch=arch, device=_device(device), progress=False,
                      adapter=peft, adapter_mask=use_mask)
        saved = getattr(lm, "adapter_wemask", None)
        if method is not None and (wemask is not None or saved is not None):
            raise MelayerError("method= replaces wemask=: give one of them (and no adapter mask)")
        if saved is not None and wemask is not None:
            raise MelayerError("peft=: the adapter re-applies the WeMask it was trained with; give no wemask= "
                               "(or peft_mask=false to choose another mask)")
        if lm.tokenizer.pad_token is None:
            lm.tokenizer.pad_token = lm.tokenizer.eos_token
        self.melayer_lm = lm
        rate = float(wemask) if wemask is not None else 0.0
        # build (and validate, scan if needed) before handing the model to HFLM
        self.wemask = saved if saved is not None else WeMask(
            lm, rate, layers=wemask_layers, select=select_rule(str(wemask_select)), gamma=float(wemask_gamma),
            token=token_rule(str(wemask_token)), me_layer=wemask_me_layer)
        kwargs.pop("tokenizer", None)
        super().__init__(pretrained=lm.model, tokenizer=lm.tokenizer, **kwargs)
        if not self.wemask.active:
            self.wemask.apply()
        self.method = None
        if method is not None:  # e.g. method=act or method=wemask_before:rate=0.01;gamma=1 (';' between parameters)
            from melayer.interventions.methods import parse_method

            self.method = parse_method(str(method)).bind(lm)
            self.method.__enter__()
        log.info("melayer: %s on %s", (self.method or self.wemask).describe(), lm.name)

    def get_model_info(self) -> dict:
        """Model facts for lm-eval's results (no hub look-up: melayer models are local)."""
        lm = self.melayer_lm
        return {
            "model_num_parameters": sum(p.numel() for p in lm.model.parameters()),
            "model_dtype": str(lm.dtype).replace("torch.", ""),
            "model_name": lm.name,
            "model_source": lm.source,
            "model_revision": "",
            "model_sha": "",
            "wemask": self.wemask.to_dict(),
            "method": self.method.to_dict() if self.method is not None else None,
        }

    def close(self) -> None:
        """Remove WeMask's (or the method's) hooks (the wrapped model is restored exactly)."""
        self.wemask.remove()
        if self.method is not None:
            self.method.__exit__(None, None, None)
            self.method = None


def _device(device: str | None) -> str | None:
    """lm-eval's CLI defaults to cuda:0; like HFLM, fall back to the CPU when CUDA is absent."""
    if device and device.startswith("cuda") and not torch.cuda.is_available():
        return None
    return device or None


def cli() -> None:
    """``melayer-lm-eval``: lm-eval's command line with the ``melayer`` model type registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    # run as a script (python -m): register and run the importable module's class, not this __main__ copy
    from melayer.eval.lm_eval_model import cli as _cli

    _cli()
else:
    model_registry.register("melayer")(MelayerLM)
