"""Read a checkpoint's weights lazily, one tensor at a time, without building the model.

Two formats: a Hugging Face directory of safetensors (``safe_open``: only the requested tensor is read) and
a GGUF file (the header is parsed once; each tensor is a slice of a memory map, dequantised on request by
the ``gguf`` package's own quant kernels). Either way a tensor comes back in the layout transformers would
load (GGUF tensors go through transformers' own GGUF tensor processors, e.g. Gemma's norm weights, which
llama.cpp stores as 1 + weight, come back as weight), so the :class:`~melayer.models.archmap.ArchSpec`
layout rules (Conv1D orientation, fused gate_up, norm weight -> gain) apply unchanged to both.

Memory stays at about one tensor: nothing is cached, and :attr:`LazyWeights.max_live` records the largest
number of tensors returned by this reader that were alive at the same time (checked by the tests).
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from melayer.models.archmap import ARCHITECTURES, LAYER_ROLES, ArchSpec, load_override
from melayer.models.derive import arch_from_config
from melayer.models.embedded import DEFAULT_MODEL, EMBEDDED
from melayer.models.gguf_file import (
    FLOAT_TYPES,
    gguf_decode,
    gguf_matmul,
    gguf_n_bytes,
    read_gguf_header,
    read_gguf_tensor,
)
from melayer.models.hf_internals import gguf_tensor_processor
from melayer.util.errors import MelayerError, UnsupportedArchitecture

CHUNK_VALUES = 1 << 18  # values per streamed block: 1 MiB as float32

# config keys that give the number of decoder layers (XGLM's num_layers; d_model is XGLM's hidden size)
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


@dataclass(frozen=True)
class Matrix:
    """One projection as stored: the rows ``rows`` of tensor ``key`` (all of them when None; one expert of a fused
    3-D tensor seen as 2-D), holding (out, in) or, ``transposed``, (in, out)."""

    key: str
    rows: tuple[int, int] | None = None
    transposed: bool = False


@dataclass
class ExpertLayer:
    """The routed experts of one MoE layer, in melayer's neuron numbering (neuron ``n`` of expert ``e`` is
    ``e * inter + n``)."""

    inputs: list[dict[str, Matrix]]  # per expert: "gate" and "up", a fused "gate_up", or "up" alone
    downs: list[Matrix]  # per expert: (hidden, inter)
    inter: int  # neurons per expert
    interleaved: bool = False  # a fused gate_up holds gate0, up0, gate1, ... (else gate rows, then up rows)
    in_bias: str | None = None  # fused biases (E, outputs): row e is expert e's
    down_bias: str | None = None

    @property
    def num_experts(self) -> int:
        return len(self.downs)


class LazyWeights:
    """Named tensors of one checkpoint, read on request; roles resolved through an :class:`ArchSpec`."""

    format = ""

    def __init__(self, name: str, source: str, config: dict[str, Any], arch: Any = None) -> None:
        self.name = name
        self.source = source
        self.config = config
        self.model_type = str(config.get("model_type") or "")
        self.arch = _arch_for_config(self.model_type, arch, config)
        # a map derived on a tiny twin of the family (no named layout, no override): melayer weights checks it there
        self.arch_from_config = not arch and self.model_type not in ARCHITECTURES
        self.num_layers = int(next((config[k] for k in _LAYER_KEYS if config.get(k)), 0))
        self.hidden_size = int(config.get("hidden_size") or config.get("n_embd") or config.get("d_model") or 0)
        self.tensors_read = 0
        self.bytes_read = 0
        self.max_live = 0
        self._live: weakref.WeakSet[torch.Tensor] = weakref.WeakSet()
        self._prefix: str | None = None
        self._layouts: dict[int, ArchSpec] = {}
        self._local = threading.local()
        self._fds: dict[Path, int] = {}
        self._fd_lock = threading.Lock()
        weakref.finalize(self, _close_all, self._fds)

    # -- to implement per format
    def keys(self) -> list[str]:
        raise NotImplementedError

    def _read(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    # -- shared
    def tensor(self, name: str) -> torch.Tensor:
        """One tensor as float32, in transformers' layout for ``name`` (a state-dict key)."""
        _return_freed_memory()
        t = self._read(name).float()
        self.tensors_read += 1
        self.bytes_read += t.numel() * 4
        self._live.add(t)
        self.max_live = max(self.max_live, len(self._live))
        return t

    def arch_at(self, layer: int) -> ArchSpec:
        """The layout of decoder ``layer``: the family's, or, where its layers differ in their FFN (DeepSeek-V3's
        and GLM-4-MoE's dense first layers), the layout whose FFN tensors this layer holds."""
        variants = self.arch.extra.get("ffn_variants")
        if not variants:
            return self.arch
        if layer not in self._layouts:
            keys, prefix = self._keyset(), self.layers_prefix()
            found = [spec for spec in self._variants()
                     if (anchor := spec.router or spec.down) and f"{prefix}.{layer}.{anchor}.weight" in keys]
            if not found:
                raise MelayerError(f"{self.source}: layer {layer} holds the FFN tensors of none of its family's layouts "
                                   "(dense or mixture of experts): an incomplete checkpoint")
            self._layouts[layer] = found[0]
        return self._layouts[layer]

    def _variants(self) -> list[ArchSpec]:
        base = self.arch.with_overrides(extra={k: v for k, v in self.arch.extra.items() if k != "ffn_variants"})
        return [base] + [base.with_overrides(**diff) for diff in self.arch.extra.get("ffn_variants") or []]

    def layer_key(self, layer: int, role: str) -> str | None:
        """The state-dict key of the weight of ``role`` in decoder ``layer`` (None if the family has no such role)."""
        path = self.arch_at(layer).path(role)
        if path is None:
            return None
        key = f"{self.layers_prefix()}.{layer}.{path}.weight"
        if key in self._keyset():
            return key
        others = [i for i in range(self.num_layers) if f"{self._prefix}.{i}.{path}.weight" in self._keyset()]
        if others:  # the family has the role, this layer lacks it: never a ranking of part of the model
            raise MelayerError(f"{self.source} has no tensor {key} though layer {others[0]} has one: an incomplete "
                               "checkpoint")
        return None

    def layers_prefix(self) -> str:
        """Where the decoder layers sit in this checkpoint's keys (``model.layers``; hub GPT-2 files drop
        ``transformer.``; multimodal ones add ``language_model.``): found from the down projection's key."""
        if self._prefix is None:
            # an MoE layer without a shared expert has no dense down; dense first layers have no router
            anchors = [a for spec in self._variants() if (a := spec.down or spec.router)]
            if not anchors:
                raise UnsupportedArchitecture(f"{self.source}: architecture map {self.arch.name!r} has no FFN down "
                                              "projection, which melayer weights reads")
            patterns = [re.compile(rf"^(.*?)\.0\.{re.escape(anchor)}\.weight$") for anchor in anchors]
            found = sorted({m.group(1) for k in self._keyset() for p in patterns if (m := p.match(k))}, key=len)
            if not found:
                raise UnsupportedArchitecture(
                    f"{self.source}: no tensor '<layers>.0.{anchors[0]}.weight' for architecture map "
                    f"{self.arch.name!r}; pass --arch NAME or --arch FILE.json naming the module paths")
            tail = self.arch.layers.rsplit(".", 1)[-1]
            self._prefix = next((p for p in found if p.split(".")[-1] == tail), found[0])
        return self._prefix

    def role_weight(self, layer: int, role: str) -> torch.Tensor | None:
        """A projection's weight as (out, in), whatever the storage (ArchSpec.linear_weight), or None."""
        key = self.layer_key(layer, role)
        if key is None:
            return None
        weight = self.arch.linear_weight(SimpleNamespace(weight=self.tensor(key)))  # type: ignore[arg-type]
        if role == "down":
            self._check_shape(key, weight, 0)
        return weight

    def ffn_in(self, layer: int, role: str) -> dict[str, torch.Tensor]:
        """The FFN input matrices held by one stored tensor, keyed ``gate``/``up`` (ArchSpec.ffn_in_matrices):
        ``role`` is ``gate``, ``up`` or ``gate_up`` (a fused tensor gives both halves from one read)."""
        key = self.layer_key(layer, role)
        if key is None:
            return {}
        arch = self.arch_at(layer)
        holder = _holder(arch.path(role), SimpleNamespace(weight=self.tensor(key)))  # type: ignore[arg-type]
        only = arch.with_overrides(**{r: (arch.path(r) if r == role else None) for r in ("gate", "up", "gate_up")})
        mats = only.ffn_in_matrices(holder)
        for mat in mats.values():
            self._check_shape(key, mat, 1)
        return mats

    def norm_gain(self, layer: int, role: str) -> torch.Tensor | None:
        """A norm's effective per-dim gain (ArchSpec.gain_from_weight), or None if absent or unweighted."""
        key = self.layer_key(layer, role)
        if key is None:
            return None
        gain = self.arch.gain_from_weight(self.tensor(key))
        self._check_shape(key, gain.reshape(1, -1), 1)
        return gain

    def _check_shape(self, key: str, t: torch.Tensor, axis: int) -> None:
        """A weight's hidden-size axis must match the checkpoint's config (a file can say anything)."""
        if t.dim() != 2 or (self.hidden_size and t.shape[axis] != self.hidden_size):
            raise MelayerError(f"{self.source}: tensor {key} has shape {tuple(t.shape)}, which does not fit the "
                               f"hidden size {self.hidden_size} of its config: a mismatched checkpoint")


    def experts(self, layer: int) -> ExpertLayer | None:
        """The routed experts of an MoE ``layer`` (None for a dense layer): fused 3-D tensors as transformers holds
        them (layout flags from the family's map), or one tensor per expert and projection as checkpoints store
        them (transformers' own conversion mapping names which is which)."""
        arch = self.arch_at(layer)
        if arch.experts is None:
            return None
        flags = arch.extra.get("experts") or {}
        has_gate, transposed = bool(flags.get("has_gate", True)), bool(flags.get("transposed", False))
        base = f"{self.layers_prefix()}.{layer}.{arch.experts}"
        first, down = f"{base}.{'gate_up_proj' if has_gate else 'up_proj'}", f"{base}.down_proj"
        keys = self._keyset()
        if first in keys and down in keys:
            n, per_in, _ = self.shape(first)
            _, per_down, last = self.shape(down)
            role = "gate_up" if has_gate else "up"
            bias = {name: key for name in ("in", "down")
                    if (key := f"{first if name == 'in' else down}_bias") in keys}
            return ExpertLayer(
                inputs=[{role: Matrix(first, (e * per_in, (e + 1) * per_in), transposed)} for e in range(n)],
                downs=[Matrix(down, (e * per_down, (e + 1) * per_down), transposed) for e in range(n)],
                inter=int(per_down if transposed else last), interleaved=not flags.get("concatenated", True),
                in_bias=bias.get("in"), down_bias=bias.get("down"))
        parts = getattr(self, "_expert_parts", {})
        if first in parts and down in parts:
            ins, downs = parts[first], parts[down].get(0, {})
            n = len(downs)
            roles = ("gate", "up") if has_gate else ("up",)
            if sorted(downs) != list(range(n)) or any(sorted(ins.get(i, {})) != list(range(n)) for i in range(len(roles))):
                raise MelayerError(f"{self.source}: the experts of layer {layer} are incomplete (each of the {n} experts "
                                   "needs its input and down projections)")
            return ExpertLayer(inputs=[{r: Matrix(ins[i][e]) for i, r in enumerate(roles)} for e in range(n)],
                               downs=[Matrix(downs[e]) for e in range(n)], inter=int(self.shape(downs[0])[-1]))
        raise MelayerError(f"{self.source}: no expert weights for layer {layer} (neither {first} nor one tensor per "
                           "expert)")

    def _keyset(self) -> set[str]:
        if not hasattr(self, "_keys_cache"):
            self._keys_cache = set(self.keys())
        return self._keys_cache

    # -- streaming reads (``melayer weights``: each tensor reduced chunk by chunk, never held whole)
    def path_key(self, layer: int, path: str | None, suffix: str = "weight") -> str | None:
        """The key of ``<layers>.<layer>.<path>.<suffix>`` if this checkpoint holds it (e.g. a bias), else None."""
        if path is None:
            return None
        key = f"{self.layers_prefix()}.{layer}.{path}.{suffix}"
        return key if key in self._keyset() else None

    def model_key(self, path: str | None) -> str | None:
        """The key of a model-level weight (the token or position embedding, an ArchSpec path): the shortest
        key ending in its last two path parts (hub GPT-2 files drop ``transformer.``, multimodal ones add a
        prefix)."""
        if path is None:
            return None
        tail = ".".join(path.split(".")[-1:]) + ".weight"
        found = sorted((k for k in self._keyset() if k == tail or k.endswith("." + tail)), key=len)
        exact = f"{path}.weight"
        return exact if exact in self._keyset() else (found[0] if found else None)

    def chunks(self, key: str, chunk_values: int | None = None, rows: tuple[int, int] | None = None) -> Any:
        """Yield ``(start, rows)`` over the stored rows of a 2-D tensor (or the stored rows ``rows``), each chunk
        float32 of about ``chunk_values`` values (rows ``start .. start + len(rows)`` of the tensor as stored)."""
        for start, stop in self.spans(key, chunk_values, rows):
            yield start, self._block(key, start, stop, owned=True)
        self.tensors_read += 1

    def disk_key(self, key: str) -> str:
        """The name the file gives tensor ``key`` (a key as transformers names it)."""
        return key

    def stored_rows(self, key: str) -> tuple[int, int]:
        """(rows, values per row) of a tensor as stored, a 3-D one (fused experts) seen as 2-D (``E x rows``)."""
        shape = self.shape(key)
        return (int(np.prod(shape[:-1])), int(shape[-1])) if len(shape) > 1 else (int(shape[0]), 1)

    def spans(self, key: str, chunk_values: int | None = None,
              rows: tuple[int, int] | None = None, at_least: int = 1) -> list[tuple[int, int]]:
        """Row ranges ``(start, stop)`` of about ``chunk_values`` values each, covering a stored tensor's rows (or
        the stored rows ``rows``), and at least ``at_least`` of them where there are that many rows."""
        n_rows, width = self.stored_rows(key)
        first, last = rows or (0, n_rows)
        step = max(1, (chunk_values or self.chunk_values(key)) // max(1, width))
        step = min(step, max(1, -(-(last - first) // at_least)))
        return [(start, min(last, start + step)) for start in range(first, last, step)]

    def matmul(self, key: str, x: torch.Tensor, pool: Any = None, chunk_values: int | None = None,
               rows: tuple[int, int] | None = None, transposed: bool | None = None) -> torch.Tensor:
        """``x @ W.T`` for a stored projection ``W`` (out, in) without ever holding ``W``: the stored rows are read
        in blocks of about ``chunk_values`` values (1 MiB as float32, so a block stays in the CPU cache), each
        block into a per-thread buffer, dequantised or converted to float32 and multiplied before the next is
        read. With ``pool`` (an executor) the blocks are spread over its threads (file reads, the dequantisation
        and torch's matmul all release the GIL). ``rows``: the stored rows holding ``W`` (one expert of a fused
        3-D tensor); ``transposed``: whether they are input dims (default: :meth:`stored_transposed`)."""
        n_rows, width = self.stored_rows(key)
        first, last = rows or (0, n_rows)
        # a tensor smaller than one span per thread is split between the threads all the same
        spans = self.spans(key, chunk_values, (first, last), getattr(pool, "_max_workers", 1) if pool else 1)
        if self.stored_transposed(key) if transposed is None else transposed:
            # stored rows are input dims: each block adds its part of every output

            def part(span: tuple[int, int]) -> torch.Tensor:
                return x[:, span[0] - first:span[1] - first] @ self._block(key, *span)

            parts = pool.map(part, spans) if pool is not None and len(spans) > 1 else map(part, spans)
            out = torch.zeros(x.shape[0], width)
            for piece in parts:
                out += piece
        else:  # stored rows are outputs: each block fills its own rows of out.T
            xt = x.T.contiguous()
            out_t = torch.empty(last - first, x.shape[0])

            def fill(span: tuple[int, int]) -> None:
                self._product(key, span, xt, out_t[span[0] - first:span[1] - first])

            list(pool.map(fill, spans) if pool is not None and len(spans) > 1 else map(fill, spans))
            out = out_t.T
        self.tensors_read += 1
        return out

    def matrix_row(self, key: str, index: int, rows: tuple[int, int] | None = None,
                   transposed: bool | None = None) -> torch.Tensor:
        """Row ``index`` of a stored projection as (out, in) (what one output reads), read alone where the storage
        allows; ``rows`` and ``transposed`` as in :meth:`matmul`."""
        first, last = rows or (0, self.stored_rows(key)[0])
        if self.stored_transposed(key) if transposed is None else transposed:
            return torch.cat([block[:, index] for _, block in self.chunks(key, rows=(first, last))])
        return self.rows(key, [first + index])[0]

    def prefetch(self, keys: list[str]) -> None:
        """Ask the OS to start reading these tensors' bytes into the page cache (``posix_fadvise WILLNEED``):
        the next layer's tensors come in while this one is reduced. A hint only; a no-op where unsupported."""
        if not hasattr(os, "posix_fadvise"):
            return
        for key in keys:
            try:
                path, offset, nbytes = self._extent(key)
                os.posix_fadvise(self._fd(path), offset, nbytes, os.POSIX_FADV_WILLNEED)
            except (OSError, MelayerError, KeyError):
                pass

    def chunk_values(self, key: str) -> int:
        """Values per streamed block of ``key`` (:data:`CHUNK_VALUES` unless the format decodes faster in larger ones)."""
        return CHUNK_VALUES

    def stored_transposed(self, key: str) -> bool:
        """Whether the stored rows of ``key`` are input dims (GPT-2's Conv1D in safetensors) rather than outputs."""
        return self.arch.conv1d and self.format == "safetensors"

    def shape(self, key: str) -> tuple[int, ...]:
        raise NotImplementedError

    def _extent(self, key: str) -> tuple[Path, int, int]:
        """(file, absolute byte offset, byte length) of a stored tensor."""
        raise NotImplementedError

    def _block(self, key: str, start: int, stop: int, owned: bool = False) -> torch.Tensor:
        """Stored rows ``start .. stop`` as float32 (rows, values per row). Unless ``owned``, the result may be a
        view of this thread's reusable buffer, valid until this thread's next read."""
        raise NotImplementedError

    def _product(self, key: str, span: tuple[int, int], xt: torch.Tensor, out: torch.Tensor) -> None:
        """``out = W @ xt`` for the stored rows ``span`` of ``key`` (the rows are outputs)."""
        torch.mm(self._block(key, *span), xt, out=out)

    def _read_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        return self._block(key, start, stop, owned=True)

    def _fd(self, path: Path) -> int:
        """A read-only descriptor of ``path``, opened once per reader (closed when the reader is freed)."""
        fd = self._fds.get(path)
        if fd is None:
            with self._fd_lock:
                fd = self._fds.get(path)
                if fd is None:
                    try:
                        fd = os.open(path, os.O_RDONLY)
                    except OSError as exc:
                        raise MelayerError(f"cannot read {path}: {exc}") from None
                    self._fds[path] = fd
        return fd

    def _raw(self, path: Path, offset: int, nbytes: int, what: str) -> memoryview:
        """``nbytes`` of ``path`` from ``offset``, read into this thread's reusable buffer (one copy out of the page
        cache, no new memory per read)."""
        local = self._local
        buf = getattr(local, "raw", None)
        if buf is None or len(buf) < nbytes:
            buf = local.raw = bytearray(max(nbytes, 1 << 20))
        view = memoryview(buf)[:nbytes]
        try:
            got = os.preadv(self._fd(path), [view], offset)
        except OSError as exc:
            raise MelayerError(f"cannot read {what} from {path}: {exc}") from None
        if got != nbytes:
            raise MelayerError(f"cannot read {what} from {path} (truncated or corrupt?)")
        with self._fd_lock:
            self.bytes_read += nbytes
        return view

    def _float_buffer(self, n: int) -> torch.Tensor:
        """This thread's reusable float32 buffer of at least ``n`` values."""
        buf = getattr(self._local, "f32", None)
        if buf is None or buf.numel() < n:
            buf = self._local.f32 = torch.empty(max(n, CHUNK_VALUES))
        return buf

    def rows(self, key: str, ids: list[int]) -> torch.Tensor:
        """Some rows of a stored 2-D tensor (e.g. embedding rows), float32."""
        return torch.cat([self._read_rows(key, i, i + 1) for i in ids]) if ids else torch.zeros(0)

    def first_token(self) -> tuple[int | None, bool]:
        """(the BOS token id, whether the tokenizer puts it first in every text), as far as the checkpoint says."""
        return None, False

    def setting(self, *names: str) -> Any:
        """A config value under the first of ``names`` it has, else transformers' default for this model type."""
        for name in names:
            if self.config.get(name) is not None:
                return self.config[name]
        try:
            from transformers import AutoConfig

            default = AutoConfig.for_model(self.model_type)
        except (ValueError, KeyError, TypeError):
            return None
        return next((getattr(default, n) for n in names if getattr(default, n, None) is not None), None)


def _close_all(fds: dict[Path, int]) -> None:
    for fd in fds.values():
        try:
            os.close(fd)
        except OSError:
            pass
    fds.clear()


def _return_freed_memory() -> None:
    """Hand memory freed by earlier tensors back to the OS before the next read (glibc's malloc_trim).

    glibc raises its mmap threshold after a large block is freed, so later tensor-sized blocks come from the
    heap and stay in the process after they are freed: without a trim, RSS grows by about one tensor per read
    even though only one is alive. A no-op where glibc is absent."""
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC: Any = None


def _holder(path: str, leaf: Any) -> Any:
    """A namespace with ``leaf`` at dotted ``path``, so ArchSpec methods that take a layer module can address
    one lazily read tensor."""
    obj = leaf
    for part in reversed(path.split(".")):
        obj = SimpleNamespace(**{part: obj})
    return obj


def _arch_for_config(model_type: str, override: Any, config: dict[str, Any]) -> ArchSpec:
    override = load_override(override)
    if isinstance(override, ArchSpec):
        return override
    if override and "layers" in override and "name" in override:  # a complete hand-written map
        return ArchSpec(**override)
    base = ARCHITECTURES.get(model_type)
    if base is None:
        base = arch_from_config(config)
    return base.with_overrides(**override) if override else base


# ----------------------------------------------------------------------------------------------------
# safetensors directories


class SafetensorsWeights(LazyWeights):
    format = "safetensors"

    def __init__(self, directory: Path, arch: Any = None) -> None:
        try:
            config = json.loads((directory / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise MelayerError(f"cannot read {directory / 'config.json'}: {exc}") from None
        if not any(k in config for k in _LAYER_KEYS) and isinstance(config.get("text_config"), dict):
            config = config["text_config"]  # a multimodal checkpoint: rank its language model
        super().__init__(directory.name, str(directory), config, arch)
        index = directory / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError) as exc:
                raise MelayerError(f"cannot read {index}: {exc}") from None
            self._files = {k: directory / v for k, v in weight_map.items()}
        else:
            files = sorted(directory.glob("*.safetensors"))
            if not files:
                raise MelayerError(f"{directory} holds no weights (no *.safetensors file)")
            self._files = {}
            for f in files:
                with self._open(f) as handle:
                    self._files.update({k: f for k in handle.keys()})
        self._disk: dict[str, str] = {}  # a key as transformers names it -> as the file names it
        if self.arch.experts is not None:
            self._convert_keys()

    def _convert_keys(self) -> None:
        """Name the tensors as transformers does after loading (an MoE checkpoint stores one tensor per expert and
        projection, transformers one fused tensor per projection): its conversion mapping for this model type
        renames keys, and the per-expert tensors of a fused one are kept by (fused key, part, expert)."""
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping

        mapping = get_checkpoint_conversion_mapping(self.model_type) or []
        files: dict[str, Path] = {}
        parts: dict[str, dict[int, dict[int, str]]] = {}
        for key, path in self._files.items():
            name: str | None = key
            for transform in mapping:
                new, matched = transform.rename_source_key(name)
                if matched is None:
                    continue
                expert = re.search(r"\.experts\.(\d+)\.", key)
                if "*" in matched and expert is not None:  # one expert's part of a fused tensor
                    ops = {type(op).__name__ for op in getattr(transform, "operations", [])}
                    if not ops <= {"MergeModulelist", "Concatenate"}:
                        raise UnsupportedArchitecture(f"{self.source}: the experts of model type {self.model_type!r} "
                                                      f"are converted with {', '.join(sorted(ops))} when loaded, which "
                                                      "melayer weights does not read")
                    parts.setdefault(new, {}).setdefault(transform.source_patterns.index(matched), {})[
                        int(expert.group(1))] = key
                    files[key] = path
                    name = None
                    break
                name = new
            if name is not None:
                files[name] = path
                if name != key:
                    self._disk[name] = key
        self._files = files
        self._expert_parts = parts

    @staticmethod
    def _open(path: Path) -> Any:
        from safetensors import SafetensorError, safe_open

        try:
            return safe_open(str(path), framework="pt")
        except (SafetensorError, OSError) as exc:
            raise MelayerError(f"{path} is not a readable safetensors file (truncated or corrupt?): {exc}") from None

    def keys(self) -> list[str]:
        return list(self._files)

    def disk_key(self, key: str) -> str:
        return self._disk.get(key, key)

    def _entry(self, key: str) -> tuple[Path, torch.dtype, tuple[int, ...], int]:
        """(file, dtype, shape, absolute byte offset) of one tensor, from its file's header."""
        path = self._files[key]
        if not hasattr(self, "_headers"):
            self._headers: dict[Path, dict[str, tuple[torch.dtype, tuple[int, ...], int]]] = {}
        if path not in self._headers:
            self._headers[path] = _safetensors_header(path)
        disk = self._disk.get(key, key)
        if disk not in self._headers[path]:
            raise MelayerError(f"{path} does not hold tensor {disk} (the index says it does)")
        return (path, *self._headers[path][disk])

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entry(key)[2]

    def _extent(self, key: str) -> tuple[Path, int, int]:
        path, dtype, shape, offset = self._entry(key)
        return path, offset, int(np.prod(shape)) * torch.empty(0, dtype=dtype).element_size()

    def _block(self, key: str, start: int, stop: int, owned: bool = False) -> torch.Tensor:
        path, dtype, shape, offset = self._entry(key)
        width = int(shape[-1]) if len(shape) > 1 else 1
        item = dtype.itemsize
        raw = self._raw(path, offset + start * width * item, (stop - start) * width * item, f"tensor {key}")
        stored = torch.frombuffer(raw, dtype=dtype).reshape(stop - start, width)
        if owned:
            return stored.float() if dtype != torch.float32 else stored.clone()
        return self._float_buffer(stored.numel())[: stored.numel()].view(stored.shape).copy_(stored)

    def first_token(self) -> tuple[int | None, bool]:
        """The BOS id from the config; whether the saved tokenizer prepends it (encoding one character)."""
        bos = self.config.get("bos_token_id")
        directory = Path(self.source)
        if not any((directory / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            return (bos if isinstance(bos, int) else None), False
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(directory))
            ids = tok("a")["input_ids"]
        except Exception:  # an unreadable tokenizer only loses the BOS hint
            return (bos if isinstance(bos, int) else None), False
        bos = tok.bos_token_id if tok.bos_token_id is not None else bos
        return bos, bool(ids) and bos is not None and ids[0] == bos

    def _read(self, name: str) -> torch.Tensor:
        from safetensors import SafetensorError

        try:
            # opened per read and copied out: safe_open hands out views of a (copy-on-write) memory map of the
            # whole file; kept open, every page read so far would stay mapped (and count in RSS), and the
            # in-place reductions of the ranking would show up in the next read of the same tensor
            with self._open(self._files[name]) as handle:
                t = handle.get_tensor(self._disk.get(name, name))
                return t.clone() if t.dtype == torch.float32 else t.float()
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise MelayerError(f"cannot read tensor {name} from {self._files[name]} (truncated or corrupt?): {exc}") from None


_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def _safetensors_header(path: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...], int]]:
    """name -> (dtype, shape, absolute byte offset) of the float tensors of one safetensors file, checked against
    the file's size (a damaged header is one clear error, never a read past the end)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if not 2 <= n <= min(size - 8, 100 << 20):
                raise ValueError(f"header length {n}")
            header = json.loads(fh.read(n))
    except (OSError, ValueError) as exc:
        raise MelayerError(f"{path} is not a readable safetensors file (truncated or corrupt?): {exc}") from None
    out = {}
    for name, info in header.items():
        if name == "__metadata__" or not isinstance(info, dict) or info.get("dtype") not in _ST_DTYPES:
            continue
        dtype = _ST_DTYPES[info["dtype"]]
        try:
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise MelayerError(f"{path}: corrupt header entry for tensor {name}") from None
        want = int(np.prod(shape)) * torch.empty(0, dtype=dtype).element_size()
        if begin < 0 or end - begin != want or 8 + n + end > size:
            raise MelayerError(f"{path} is truncated or corrupt: tensor {name} does not fit the file")
        out[name] = (dtype, shape, 8 + n + begin)
    return out


# ----------------------------------------------------------------------------------------------------
# GGUF files


class GGUFWeights(LazyWeights):
    """A GGUF file read lazily: a header parse that skips the values it does not need (gguf's own reader
    builds a Python object per vocabulary entry, ~30 s for Gemma's 262k tokens on this machine), then each
    tensor a memory-mapped slice dequantised by ``gguf.quants``."""

    format = "gguf"

    def __init__(self, path: Path, arch: Any = None) -> None:
        self.path = path
        meta, infos, data_start = read_gguf_header(path)
        gguf_arch = str(meta.get("general.architecture", ""))
        # (the header parse has checked every tensor against the file's size)
        self._infos = {name: (dims, qtype, data_start + offset) for name, (dims, qtype, offset) in infos.items()}
        model_type = gguf_arch  # llama.cpp names text-only Gemma 3 "gemma3"; transformers' model_type is gemma3_text
        if gguf_arch not in ARCHITECTURES and f"{gguf_arch}_text" in ARCHITECTURES:
            model_type = f"{gguf_arch}_text"
        config = {"model_type": model_type, "num_hidden_layers": meta.get(f"{gguf_arch}.block_count"),
                  "hidden_size": meta.get(f"{gguf_arch}.embedding_length"),
                  "num_attention_heads": meta.get(f"{gguf_arch}.attention.head_count"),
                  "num_key_value_heads": meta.get(f"{gguf_arch}.attention.head_count_kv"),
                  "rms_norm_eps": meta.get(f"{gguf_arch}.attention.layer_norm_rms_epsilon"),
                  "layer_norm_epsilon": meta.get(f"{gguf_arch}.attention.layer_norm_epsilon"),
                  "num_experts_per_tok": meta.get(f"{gguf_arch}.expert_used_count"),
                  "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
                  "add_bos_token": meta.get("tokenizer.ggml.add_bos_token")}
        self.expert_count = int(meta.get(f"{gguf_arch}.expert_count") or 0)
        if model_type not in ARCHITECTURES:  # a family derived from its config: transformers' own GGUF config map
            config = _gguf_config(gguf_arch, meta, config)
        super().__init__(path.name, str(path), config, arch)
        if self.expert_count and self.arch.experts is None:
            raise UnsupportedArchitecture(
                f"{path}: a mixture-of-experts GGUF ({self.expert_count} experts per layer) of architecture "
                f"{gguf_arch!r}, whose experts transformers maps for no model type (transformers reads the experts of "
                f"GGUF architectures {', '.join(gguf_moe_architectures())}); pass --arch FILE.json naming them, e.g. "
                '{"router": "mlp.gate", "experts": "mlp.experts", "gate": null, "up": null, "down": null}')
        self.gguf_arch = gguf_arch
        import gguf

        arch_enum = next((k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == gguf_arch), None)
        if arch_enum is None:
            raise UnsupportedArchitecture(f"{path}: GGUF architecture {gguf_arch!r} is unknown to the gguf package")
        self._name_map = gguf.get_tensor_name_map(arch_enum, self.num_layers)
        self._gguf_config = config
        self._processor_obj: Any = None
        self._hf_to_gguf: dict[str, str] = {}

    def experts(self, layer: int) -> ExpertLayer | None:
        """The routed experts of an MoE ``layer`` as llama.cpp stores them: one 3-D tensor per projection,
        ``blk.N.ffn_gate_exps`` / ``ffn_up_exps`` / ``ffn_down_exps`` (GGUF dims: inputs, outputs, experts), so
        expert ``e``'s rows of a projection are stored rows ``e x outputs .. (e + 1) x outputs``, outputs by row
        as in a dense GGUF matrix. Each is named by the key transformers gives the projection (the ``down_proj``
        of the fused experts module, whose (E, hidden, I) layout its index follows)."""
        arch = self.arch_at(layer)
        if arch.experts is None:
            return None
        import gguf

        flags = arch.extra.get("experts") or {}
        parts = ("gate", "up", "down") if flags.get("has_gate", True) else ("up", "down")
        base = f"{self.layers_prefix()}.{layer}.{arch.experts}"
        names = {p: gguf.TENSOR_NAMES[t].format(bid=layer) + ".weight" for p, t in
                 (("gate", gguf.MODEL_TENSOR.FFN_GATE_EXP), ("up", gguf.MODEL_TENSOR.FFN_UP_EXP),
                  ("down", gguf.MODEL_TENSOR.FFN_DOWN_EXP))}
        held = sorted(n for n in self._infos if n.startswith(f"blk.{layer}.") and "_exps." in n)
        unread = [n for n in held if n not in names.values()] + [n for p, n in names.items() if p not in parts and n in held]
        missing = [names[p] for p in parts if names[p] not in self._infos]
        if missing or unread:
            raise UnsupportedArchitecture(
                f"{self.path}: layer {layer}'s experts are not stored as melayer weights reads a mixture-of-experts GGUF "
                f"({' / '.join(names[p] for p in parts)}, weights only): "
                + (f"no {', '.join(missing)}" if missing else f"it also holds {', '.join(unread)}")
                + f" (expert tensors here: {', '.join(held) or 'none'})")
        dims = {p: self._infos[names[p]][0] for p in parts}
        n_exp, inter, hidden = int(dims["down"][2]) if len(dims["down"]) == 3 else 0, int(dims["down"][0]), self.hidden_size
        for p, d in dims.items():
            want = (hidden, inter, n_exp) if p != "down" else (inter, hidden, n_exp)
            if tuple(int(x) for x in d) != want or not n_exp:
                raise MelayerError(f"{self.path}: tensor {names[p]} has GGUF dims {tuple(d)}, not {want} (hidden size "
                                   f"{hidden}, {n_exp} experts of {inter} neurons): a mismatched checkpoint")
        keys = {p: f"{base}.{p}_proj" for p in parts}
        self._hf_to_gguf.update({keys[p]: names[p] for p in parts})
        width = {p: inter if p != "down" else hidden for p in parts}
        return ExpertLayer(
            inputs=[{p: Matrix(keys[p], (e * width[p], (e + 1) * width[p])) for p in parts if p != "down"}
                    for e in range(n_exp)],
            downs=[Matrix(keys["down"], (e * hidden, (e + 1) * hidden)) for e in range(n_exp)], inter=inter)

    def gguf_name(self, hf_name: str) -> str | None:
        """The GGUF tensor name of a state-dict key, by gguf's own tensor-name map."""
        base, _, suffix = hf_name.rpartition(".")
        mapped = self._name_map.get_name(base)
        return None if mapped is None or f"{mapped}.{suffix}" not in self._infos else f"{mapped}.{suffix}"

    def keys(self) -> list[str]:
        """State-dict keys of the tensors this file holds that the ArchSpec names: every layer role's weight and
        bias, the attention's value/output projections, the token and position embeddings."""
        a = self.arch
        paths = {a.path(role) for role in LAYER_ROLES} | {a.attn_v, a.attn_o, a.attn_qkv}
        wanted = [f"{p}.weight" for p in (a.embed, a.pos_embed) if p]
        for layer in range(self.num_layers):
            wanted += [f"{a.layers}.{layer}.{p}.{s}" for p in sorted(x for x in paths if x) for s in ("weight", "bias")]
        out = []
        for key in wanted:
            name = self.gguf_name(key)
            if name is not None:
                self._hf_to_gguf[key] = name
                out.append(key)
        return out

    def _info(self, key: str) -> tuple[tuple[int, ...], Any, int]:
        gname = self._hf_to_gguf.get(key) or self.gguf_name(key)
        if gname is None:
            raise MelayerError(f"{self.path}: no tensor for {key}")
        return self._infos[gname]

    def shape(self, key: str) -> tuple[int, ...]:
        dims = self._info(key)[0]
        return tuple(reversed(dims)) if len(dims) > 1 else (1, int(dims[0]))

    @property
    def _processor(self) -> Any:
        """transformers' GGUF tensor processor for this architecture (imported on the first whole-tensor read)."""
        if self._processor_obj is None:
            self._processor_obj = gguf_tensor_processor(self.gguf_arch, self._gguf_config)
        return self._processor_obj

    QUANT_CHUNK_VALUES = 1 << 20
    QUANT_SPAN_VALUES = 1 << 23

    def chunk_values(self, key: str) -> int:
        """Quantised tensors stream in spans of :attr:`QUANT_SPAN_VALUES` values, each dequantised
        :attr:`QUANT_CHUNK_VALUES` values (4 MiB as float32) at a time: their decoding is a few dozen whole-array
        operations, whose fixed cost dominates smaller blocks, and what can be done once per span is."""
        qtype = self._info(key)[1]
        return CHUNK_VALUES if getattr(qtype, "name", "") in FLOAT_TYPES else self.QUANT_SPAN_VALUES

    def _product(self, key: str, span: tuple[int, int], xt: torch.Tensor, out: torch.Tensor) -> None:
        qtype = self._info(key)[1]
        if getattr(qtype, "name", "") in FLOAT_TYPES:
            super()._product(key, span, xt, out)
            return
        buffer = self._float_buffer(self.QUANT_CHUNK_VALUES)[: self.QUANT_CHUNK_VALUES]
        try:
            gguf_matmul(self._stored_bytes(key, *span), qtype, xt, out, buffer)
        except NotImplementedError as exc:
            raise MelayerError(f"{self.path}: cannot dequantise {key}: {exc}") from None

    def _extent(self, key: str) -> tuple[Path, int, int]:
        dims, qtype, offset = self._info(key)
        return self.path, offset, gguf_n_bytes(dims, qtype)

    def _stored_bytes(self, key: str, start: int, stop: int) -> np.ndarray:
        """The bytes of stored rows ``start .. stop``, (rows, bytes per row)."""
        dims, qtype, offset = self._info(key)
        n_rows = math.prod(dims[1:]) if len(dims) > 1 else 1
        row_bytes = gguf_n_bytes(dims, qtype) // n_rows
        raw = self._raw(self.path, offset + start * row_bytes, (stop - start) * row_bytes, f"tensor {key}")
        return np.frombuffer(raw, dtype=np.uint8).reshape(stop - start, row_bytes)

    def _block(self, key: str, start: int, stop: int, owned: bool = False) -> torch.Tensor:
        dims, qtype, offset = self._info(key)
        rows = self._stored_bytes(key, start, stop)
        try:
            out = None if owned else self._float_buffer((stop - start) * int(dims[0]))
            return gguf_decode(rows, qtype, out=out, owned=owned)
        except NotImplementedError as exc:
            raise MelayerError(f"{self.path}: cannot dequantise {key}: {exc}") from None

    def first_token(self) -> tuple[int | None, bool]:
        bos = self.config.get("bos_token_id")
        return (int(bos) if bos is not None else None), bool(self.config.get("add_bos_token")) and bos is not None

    def _read(self, name: str) -> torch.Tensor:
        gname = self._hf_to_gguf.get(name) or self.gguf_name(name)
        if gname is None:
            raise MelayerError(f"{self.path}: no tensor for {name}")
        dims, qtype, start = self._infos[gname]
        try:
            values = read_gguf_tensor(self.path, dims, qtype, start)
        except NotImplementedError as exc:
            raise MelayerError(f"{self.path}: cannot dequantise {gname}: {exc}") from None
        values = self._processor.process(weights=values, name=gname).weights
        values = np.ascontiguousarray(values, dtype=np.float32)
        if not values.flags.writeable:  # F32 tensors come back as a view of the read-only memory map
            values = values.copy()
        return torch.from_numpy(values)


def gguf_moe_architectures() -> list[str]:
    """The GGUF architectures whose mixture-of-experts config transformers maps (an expert count in its GGUF
    config map), as GGUF files name them."""
    import gguf
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    known = {_plain(v): v for v in gguf.MODEL_ARCH_NAMES.values()}
    return sorted(known.get(_plain(t), t) for t, keys in GGUF_CONFIG_MAPPING.items() if isinstance(keys, dict) and "expert_count" in keys)


def _plain(name: str) -> str:
    return name.replace("_", "").replace("-", "")


def _gguf_config(gguf_arch: str, meta: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """``config`` completed by transformers' own GGUF config map (``integrations.ggml``): the model type it gives
    the GGUF architecture (llama.cpp's ``qwen2moe`` is transformers' ``qwen2_moe``), every metadata value it
    maps to a config key, and the defaults it sets for GGUF files (Qwen3-MoE's renormalised routing weights)."""
    from transformers.integrations.ggml import GGUF_CONFIG_DEFAULTS_MAPPING, GGUF_CONFIG_MAPPING

    model_type = next((t for t in GGUF_CONFIG_MAPPING if t != "general" and _plain(t) == _plain(gguf_arch)), None)
    if model_type is None:
        return config
    out = {**config, "model_type": model_type}
    keys = GGUF_CONFIG_MAPPING[model_type]
    for suffix, name in keys.items() if isinstance(keys, dict) else ():
        if isinstance(name, str) and out.get(name) is None and meta.get(f"{gguf_arch}.{suffix}") is not None:
            out[name] = meta[f"{gguf_arch}.{suffix}"]
    for name, value in GGUF_CONFIG_DEFAULTS_MAPPING.get(model_type, {}).items():
        out.setdefault(name, value)
    return out


# ----------------------------------------------------------------------------------------------------


def open_weights(spec: str | Path | None, arch: Any = None) -> LazyWeights:
    """A lazy reader for an embedded model name, a .gguf file, or a local HF directory (safetensors or one .gguf)."""
    text = str(spec or DEFAULT_MODEL).strip()
    if text in EMBEDDED:
        return GGUFWeights(EMBEDDED[text][1](), arch)
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix == ".gguf":
            return GGUFWeights(path, arch)
        raise MelayerError(f"{path} is a file but not a .gguf; pass a GGUF file or a model directory")
    if path.is_dir():
        if (path / "config.json").exists():
            return SafetensorsWeights(path, arch)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return GGUFWeights(ggufs[0], arch)
        if len(ggufs) > 1:
            raise MelayerError(f"{path} holds several .gguf files; pass one of them")
        raise MelayerError(f"{path} holds no model weights (no config.json and no .gguf file)")
    raise MelayerError(f"no such file or directory: {text} (weights reads local checkpoints only)")
