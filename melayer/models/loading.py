"""``melayer.load``: resolve a model spec, convert GGUF once, cache, and bind the architecture map.

transformers rebuilds a GGUF tokenizer and dequantises its tensors on every start (~36 s for
Gemma-3-270M). We do that once, save the result as a regular Hugging Face directory under
``$MELAYER_CACHE`` (default ``~/.cache/melayer``) and load that directory afterwards.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import torch
from torch import nn

from melayer.models.archmap import ArchSpec, resolve
from melayer.models.cache import cache_dir
from melayer.models.complete import incomplete
from melayer.models.convert import converted, take_fresh
from melayer.models.derive import arch_for
from melayer.models.devices import execution_device, materialized, parse_device_map, parse_max_memory, read, read_param
from melayer.models.embedded import DEFAULT_MODEL, EMBEDDED
from melayer.models.experts import FusedExperts
from melayer.models.guard import OverflowGuard, install_overflow_guard, overflow_guard
from melayer.util.errors import MelayerError, one_line

if TYPE_CHECKING:
    from collections.abc import Sequence

    from transformers import PreTrainedModel

DType = Literal["float32", "bfloat16", "float16", "fp32", "bf16", "fp16"]  # a dtype by name
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


@dataclass
class LM:
    """A loaded causal LM plus the architecture map that says where each role lives.

    Attributes:
        model: the transformers model (the whole causal LM, text tower and head included).
        tokenizer: its tokenizer.
        name: a short name for outputs and reports.
        arch: where each role (norms, attention, FFN projections, experts, ...) lives in this model.
        source: where the model was loaded from (a name, a directory or a file).
        me_layers: the ME layers found by scans of this model, cached by prompts and criterion, so that
            :func:`melayer.wemask` and the interventions do not scan twice.
        adapter_wemask: the WeMask a fine-tuning adapter loaded with ``melayer.load(adapter=...)`` was trained
            with (None: none).
    """

    model: PreTrainedModel
    tokenizer: Any
    name: str
    arch: ArchSpec
    source: str = ""

    # the ME layers found by scans of this model, keyed by (prompts, criterion): see melayer.analysis.me_layer
    me_layers: dict[Any, int | None] = field(default_factory=dict, repr=False, compare=False)
    # the WeMask a PEFT adapter attached by melayer.load(adapter=...) was trained with (None: none)
    adapter_wemask: Any = field(default=None, repr=False, compare=False)

    def trace(self, prompts: str | Sequence[str], sites: str | Sequence[str] = "resid_out",
              layers: int | Sequence[int] | None = None, **options: Any) -> Any:
        """The activations at melayer's named capture sites: :func:`melayer.trace` on this model.

        >>> t = lm.trace(["The cat sat.", "Hello"], sites=["resid_out", "attn_in"], layers=[2, 3])
        >>> t["resid_out", 3]                   # one (tokens, hidden) tensor per prompt, padding removed
        >>> lm.trace(prompts, sites="blocks.3.hook_resid_post", reduce="max_abs")["resid_out", 3]

        Args:
            prompts: one prompt or several.
            sites: melayer site names (``resid_out``, ``attn_in``, ``down_in`` ...) or TransformerLens hook names
                (``hook_resid_post``, ``ln1.hook_out``, ``blocks.3.hook_resid_post``).
            layers: the layers to trace (default: all, or those the ``blocks.L`` names give).
            **options: ``reduce``, ``batch_size``, ``device``, as :func:`melayer.trace` takes them.

        Returns:
            A :class:`~melayer.capture.trace.Trace`: ``trace[site, layer]`` is one tensor per prompt.

        Raises:
            MelayerError: an empty prompt, an unknown site, a layer out of range, or a site the family lacks.
        """
        from melayer.util.tracing import tracer

        return tracer()(self, prompts, sites, layers, **options)

    def guard_overflow(self) -> OverflowGuard:
        """Install the overflow guard (once).

        Every forward that produces inf/nan then raises :class:`~melayer.util.errors.NumericOverflow` naming the
        first layer that did.

        Returns:
            The guard (the one already installed, if any); its ``remove()`` takes it off.
        """
        return install_overflow_guard(self.model, self.layers, self.body)

    @property
    def overflow_guard(self) -> OverflowGuard | None:
        """The installed overflow guard, or None."""
        return overflow_guard(self.model)

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def layers(self) -> nn.ModuleList:
        return resolve(self.model, self.arch.layers)  # type: ignore[return-value]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        cfg = self.model.config
        cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        return int(getattr(cfg, "hidden_size", None) or cfg.n_embd)

    @property
    def body(self) -> nn.Module:
        """The decoder stack without the LM head (``model.model`` for most families)."""
        return resolve(self.model, self.arch.body)  # type: ignore[return-value]

    @property
    def device(self) -> torch.device:
        """Where inputs go: the embedding's (execution) device. Under a ``device_map`` later layers may sit
        elsewhere; hooks build their tensors on the device of the hidden state they touch."""
        return execution_device(self.model.get_input_embeddings())

    @property
    def max_positions(self) -> int | None:
        """How many positions the model was built for (the config keys lm-eval's HFLM reads, in its order)."""
        for key in ("n_positions", "max_position_embeddings", "n_ctx"):
            value = getattr(self.config, key, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    @property
    def learned_positions(self) -> bool:
        """True if positions are rows of an embedding table (GPT-2's ``wpe``): no input may be longer than
        :attr:`max_positions`. Rotary and ALiBi models can run past it (extrapolating)."""
        n = self.max_positions
        if n is None:
            return False
        words = self.model.get_input_embeddings()
        return any(isinstance(m, nn.Embedding) and m is not words and n <= m.num_embeddings <= n + 2
                   for m in self.model.modules())

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def module(self, layer: int, role: str) -> nn.Module | None:
        """The module playing ``role`` in one decoder layer.

        Args:
            layer: the decoder layer's index.
            role: a role of the architecture map (``"attn"``, ``"down"``, ``"pre_attn_norm"``, ...).

        Returns:
            The module, or None if the family has no such role.
        """
        return resolve(self.layers[layer], self.arch.path(role, layer))

    def required(self, layer: int, role: str) -> nn.Module:
        """The module playing ``role`` in one decoder layer, which must exist.

        Args:
            layer: the decoder layer's index.
            role: a role of the architecture map.

        Returns:
            The module.

        Raises:
            MelayerError: the family has no such module in that layer.
        """
        module = self.module(layer, role)
        if module is None:
            raise MelayerError(f"{self.name}: layer {layer} has no {role} module")
        return module

    def norm_gain(self, layer: int, role: str) -> torch.Tensor | None:
        """The effective per-dim gain of a norm (its weight plus the family's offset).

        Args:
            layer: the decoder layer's index.
            role: a norm role (``"pre_attn_norm"``, ``"post_attn_norm"``, ``"pre_ffn_norm"``, ``"post_ffn_norm"``).

        Returns:
            The gain as a float tensor, or None if the norm is absent or has no weight.
        """
        norm = self.module(layer, role)
        weight = read_param(norm, "weight") if norm is not None else None
        if weight is None:
            return None
        return self.arch.gain_from_weight(weight.float())

    def neuron_projection(self, layer: int) -> nn.Module | None:
        """The projection whose inputs are the layer's neurons: the FFN's ``down``, or, in a layer without an FFN
        (a pure SSM's), the mixer's output projection (``mixer_out``).

        Args:
            layer: the decoder layer's index.

        Returns:
            The module, or None when the layer has neither (or its FFN is a mixture of experts without shared one).
        """
        down = self.module(layer, "down")
        return down if down is not None or self.experts(layer) is not None else self.module(layer, "mixer_out")

    def experts(self, layer: int) -> FusedExperts | None:
        """The fused experts of an MoE layer.

        Args:
            layer: the decoder layer's index.

        Returns:
            The experts, or None for a dense layer.
        """
        module = self.module(layer, "experts")
        return FusedExperts(module) if module is not None else None

    def ffn_segments(self, layer: int) -> list[dict[str, Any]]:
        """How the FFN neurons of ``layer`` are numbered.

        Args:
            layer: the decoder layer's index.

        Returns:
            ``{"expert", "start", "size"}`` segments: one per routed expert (neuron ``e * I + n``), then the
            shared expert's; one segment for a dense FFN; none for a layer without an FFN.
        """
        fused = self.experts(layer)
        if fused is None:
            down = self.neuron_projection(layer)
            return [] if down is None else [{"expert": None, "start": 0, "size": self.down_weight(layer).shape[1]}]
        segs: list[dict[str, Any]] = [{"expert": e, "start": e * fused.inter, "size": fused.inter}
                                      for e in range(fused.num_experts)]
        if (down := self.module(layer, "down")) is not None:
            size = self.arch.at(layer).down_matrix(down).shape[1]
            segs.append({"expert": "shared", "start": fused.num_experts * fused.inter, "size": size})
        return segs

    # Weight reads go through models.devices.read: an offloaded layer's weights are materialised for the read.
    def down_weight(self, layer: int) -> torch.Tensor:
        """The ``down`` weight as (hidden_out, intermediate), whatever the storage layout.

        For an MoE layer, every routed expert's down projection side by side, then the shared expert's (see
        :meth:`ffn_segments`); for a layer without FFN, the mixer's output projection (:meth:`neuron_projection`).
        An offloaded layer's weights are materialised for the read.

        Args:
            layer: the decoder layer's index.

        Returns:
            The (hidden, neurons) matrix.
        """
        fused = self.experts(layer)
        if fused is None:
            down = self.neuron_projection(layer)
            if down is None:
                raise MelayerError(f"{self.name}: layer {layer} has no down module")
            return read(down, self.arch.at(layer).down_matrix)
        with materialized(self.layers[layer]):
            mats = [fused.down(e).detach() for e in range(fused.num_experts)]
            shared = self.module(layer, "down")
            if shared is not None:
                mats.append(self.arch.at(layer).down_matrix(shared).detach())
            return torch.cat(mats, dim=1)

    def ffn_in_weights(self, layer: int) -> dict[str, torch.Tensor]:
        """The FFN input projections of ``layer`` as (intermediate, hidden) matrices.

        Args:
            layer: the decoder layer's index.

        Returns:
            ``{"gate": ..., "up": ...}`` (``gate`` absent without one); an MoE layer's numbered as
            :meth:`ffn_segments`.
        """
        fused = self.experts(layer)
        with materialized(self.layers[layer]) as moved:
            if fused is None:
                return {k: (w.detach().clone() if moved else w.detach())
                        for k, w in self.arch.at(layer).ffn_in_matrices(self.layers[layer]).items()}
            parts = [fused.inputs(e) for e in range(fused.num_experts)]
            if self.module(layer, "down") is not None:
                parts.append(self.arch.at(layer).ffn_in_matrices(self.layers[layer]))
            keys = [k for k in ("gate", "up") if all(k in p for p in parts)]
            return {k: torch.cat([p[k].detach() for p in parts]) for k in keys}


# ----------------------------------------------------------------------------------------------------
# spec resolution


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or spec.endswith((".gguf", "/")) or os.sep in spec.strip("/").split("/", 1)[0]


def resolve_source(spec: str | None) -> tuple[str, str]:
    """Map a user spec to (display name, local HF directory or hub id)."""
    spec = (spec or DEFAULT_MODEL).strip()
    if spec in EMBEDDED:
        label, finder = EMBEDDED[spec]
        return label, str(converted(finder()))
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise MelayerError(f"{path} is a file but not a .gguf; pass a GGUF file or a model directory")
        return path.name, str(converted(path))
    if path.is_dir():
        if (path / "config.json").exists():
            return path.resolve().name, str(path.resolve())
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0].name, str(converted(ggufs[0]))
        if len(ggufs) > 1:
            raise MelayerError(f"{path} holds several .gguf files; pass one of them")
        raise MelayerError(f"{path} holds no model (no config.json and no .gguf file)")
    if _looks_like_path(spec) or spec.count("/") > 1:
        raise MelayerError(f"no such file or directory: {spec}")
    return spec, spec  # a hub id


@contextlib.contextmanager
def _library_bars_off() -> Iterator[None]:
    """Silence transformers' own tqdm bars ("Loading weights", "Writing model shards"): melayer reports its
    progress itself, and an error must stay the only line on stderr."""
    from transformers.utils import logging as hf_logging

    was_on, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()  # its load report too: a gap in the weights is melayer's one-line error
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if was_on:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _removed_on_error(folder: str | None) -> Iterator[None]:
    try:
        yield
    except BaseException:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        raise


def _load_tokenizer(source: str, trust_remote_code: bool = False) -> Any:
    """Tokenizer; melayer's own cache directories take a fast path.

    ``AutoTokenizer`` parses ``tokenizer.json`` in Python and rebuilds the vocabulary (~4 s for Gemma's
    262k entries); for a directory melayer wrote itself we hand the file straight to the Rust
    ``tokenizers`` library (~1 s) with the special tokens and chat template from the saved config.
    The result encodes and decodes identically (tested).
    """
    import json

    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(source)
    if path.is_dir() and path.parent == cache_dir() / "hf" and (path / "tokenizer.json").exists():
        cfg = json.loads((path / "tokenizer_config.json").read_text())
        keys = ("bos_token", "eos_token", "pad_token", "unk_token", "chat_template", "model_max_length")
        kwargs = {k: cfg[k] for k in keys if cfg.get(k) is not None}
        template = path / "chat_template.jinja"
        if template.exists():
            kwargs["chat_template"] = template.read_text()
        return PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"), **kwargs)
    return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)


def load(
    spec: str | None = None,
    *,
    dtype: DType | torch.dtype = "float32",
    device: str | None = None,
    arch: Any = None,
    progress: bool = True,
    device_map: str | dict | None = None,
    max_memory: str | dict | None = None,
    offload_folder: str | Path | None = None,
    trust_remote_code: bool = False,
    overflow_guard: bool = True,
) -> LM:
    """Load a causal LM by spec (embedded name, HF directory, .gguf file or hub id).

    ``trust_remote_code``: a checkpoint's own Python code (``auto_map`` in its config) never runs unless this is
    True (transformers would otherwise ask on a terminal); the ``melayer`` command never sets it.

    ``arch`` overrides the architecture map: a mapped family name, a dict of role -> module path,
    a JSON file, or an :class:`ArchSpec`. ``device_map`` (``"auto"``, ``"balanced"``, ``"sequential"``, a dict
    of module -> device, ``"cpu"``/``"disk"`` entries offload) and ``max_memory`` (``{0: "20GiB", "cpu":
    "64GiB"}`` or ``"0=20GiB,cpu=64GiB"``; implies ``device_map="auto"``) split the model with accelerate;
    layers offloaded to disk go to ``offload_folder`` (default: a fresh folder under the cache, removed when
    the model is garbage-collected). ``overflow_guard``: raise on inf/nan in any forward (see :meth:`LM.guard_overflow`).
    """
    torch_dtype = _DTYPES.get(dtype, None) if isinstance(dtype, str) else dtype
    if torch_dtype is None:
        raise MelayerError(f"unknown dtype {dtype!r}; use one of {', '.join(sorted(_DTYPES))}")
    device_map, max_memory = parse_device_map(device_map), parse_max_memory(max_memory)
    if max_memory is not None and device_map is None:
        device_map = "auto"
    if device_map is not None and device:
        raise MelayerError("give a device or a device map, not both")
    name, source = resolve_source(spec)
    placement: dict[str, Any] = {}
    own_folder: str | None = None  # an offload folder made here, removed with the model
    if device_map is not None:
        placement = {"device_map": device_map, "max_memory": max_memory}
        if offload_folder is None:
            (cache_dir() / "offload").mkdir(parents=True, exist_ok=True)
            offload_folder = own_folder = tempfile.mkdtemp(prefix="run-", dir=cache_dir() / "offload")
        placement["offload_folder"] = str(offload_folder)
    from transformers import AutoModelForCausalLM

    is_hub = not Path(source).exists()
    fresh = take_fresh(source)
    try:
        with _library_bars_off(), _removed_on_error(own_folder):
            tokenizer = _load_tokenizer(source, trust_remote_code)
            if fresh is not None and not placement:
                model = fresh.to(torch_dtype)
            else:
                # with output_loading_info transformers returns (model, info); its annotation names the model only
                model, info = cast("tuple[PreTrainedModel, dict[str, Any]]", AutoModelForCausalLM.from_pretrained(
                    source, dtype=torch_dtype, output_loading_info=True, trust_remote_code=trust_remote_code,
                    **placement))
                error = incomplete(source, info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"])
                if error is not None:
                    raise error
    except MelayerError:
        if Path(source).parent == cache_dir() / "hf":  # an incomplete conversion never stays in the cache
            shutil.rmtree(source, ignore_errors=True)
        raise
    except OSError as exc:
        where = "the Hugging Face hub (are you offline?)" if is_hub else source
        raise MelayerError(f"cannot load {spec!r} from {where}: {one_line(exc)}") from None
    except ValueError as exc:
        if "trust_remote_code" in str(exc) and not trust_remote_code:  # transformers' refusal of auto_map code
            raise MelayerError(f"{spec} comes with its own Python code (auto_map), which melayer does not run; if "
                               "you trust it, load it in Python with melayer.load(..., trust_remote_code=True)") from None
        raise MelayerError(f"cannot load {spec!r}: {one_line(exc)}") from None
    except Exception as exc:  # e.g. safetensors' SafetensorError on a truncated or corrupt weights file
        raise MelayerError(f"cannot load {spec!r}: corrupt model files? ({type(exc).__name__}: {one_line(exc)})") from None
    if device:
        model.to(device)
    if own_folder is not None:
        weakref.finalize(model, shutil.rmtree, own_folder, True)
    model.eval()
    lm = LM(model=model, tokenizer=tokenizer, name=name, arch=arch_for(model, arch), source=source)
    if overflow_guard:
        lm.guard_overflow()
    return lm


def from_model(model: PreTrainedModel, tokenizer: Any, name: str = "model", arch: Any = None,
               overflow_guard: bool = False) -> LM:
    """Wrap a model already in memory (``transformers`` causal LM, or a tiny test checkpoint) for melayer, without
    changing it.

    Args:
        model: the model. Its train/eval mode, device, dtype and hooks are left as they are (call
            ``model.eval()`` yourself for analyses without dropout).
        tokenizer: its tokenizer.
        name: the name recorded in results.
        arch: an architecture-map override (a mapped family name, a dict of role -> module path, a JSON file or
            an :class:`~melayer.models.archmap.ArchSpec`); default: found from the model's modules.
        overflow_guard: install the overflow guard (:meth:`LM.guard_overflow`); off by default on your model.

    Returns:
        The model, tokenizer and architecture map as an :class:`LM` sharing ``model``.

    Raises:
        UnsupportedArchitecture: the model's modules cannot be mapped onto melayer's roles.
    """
    lm = LM(model=model, tokenizer=tokenizer, name=name, arch=arch_for(model, arch))
    if overflow_guard:
        lm.guard_overflow()
    return lm
