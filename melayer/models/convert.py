"""GGUF -> a regular Hugging Face directory, once: read the metadata, rebuild the tokenizer, dequantise, save.

transformers' own entry points each parse the whole GGUF again (``AutoTokenizer`` parses it to pick the
tokenizer class, ``AutoModelForCausalLM`` once for the config and once for the tensors); for a 262k-entry
vocabulary every ``gguf.GGUFReader`` parse builds ~800k NumPy views in Python (~8 s here). Here the same library
functions run so that the file is parsed once: the metadata (after melayer's header parse has bounded every count
and size by the file's size, so gguf's reader never sees an absurd one), the tokenizer through its class's own GGUF reader, and the tensors located by melayer's header
parse (:mod:`melayer.models.gguf_file`, which skips the vocabulary) and turned into the state dict with transformers'
own tensor processors, key map and gguf's dequantisation (:func:`gguf_state_dict`; bit-identical to
``from_pretrained(gguf_file=...)``, tested). Architectures transformers loads through its newer header-based
GGUF path are left to ``from_pretrained``. transformers' per-tensor progress bar (plain tqdm, which
``transformers.utils.logging.disable_progress_bar`` does not reach) is kept off stderr; melayer shows one
status line per phase instead.

The phases' wall-clock seconds of the last conversion in this process are in :data:`convert_timings`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self, cast

import torch

from melayer.models.cache import cache_dir, cache_lock, drop_link
from melayer.models.complete import check_state_dict, expected_weights, incomplete
from melayer.models.gguf_file import read_gguf_header, read_gguf_tensor
from melayer.models.hf_internals import drop_gguf_quantizer, gguf_tensor_processor
from melayer.util.errors import MelayerError, one_line
from melayer.util.io import apply_umask

if TYPE_CHECKING:
    from transformers import PreTrainedModel

convert_timings: dict[str, float] = {}
# part of every cached conversion's key: raised when a conversion made by an earlier melayer must not be reused
# (format 2: conversions are checked to hold every weight; earlier ones could hold randomly initialised ones)
CONVERSION_FORMAT = 2


class _Steps:
    """One status line on the real stderr, updated per phase, and the phases' timings."""

    def __init__(self, title: str | None) -> None:
        self.title = title
        self.t = time.perf_counter()
        self.name: str | None = None
        self.status: Any = None

    def __enter__(self) -> Self:
        convert_timings.clear()
        if self.title is not None and not os.environ.get("MELAYER_QUIET"):
            from rich.console import Console

            # bound to the stream as it is now, so it still shows while the library's stderr is muted
            self.status = Console(file=sys.stderr).status(self.title)
            self.status.__enter__()
        return self

    def step(self, name: str) -> None:
        self._close()
        self.name = name
        if self.status is not None:
            self.status.update(f"{self.title} {name} ...")

    def _close(self) -> None:
        now = time.perf_counter()
        if self.name is not None:
            convert_timings[self.name] = now - self.t
        self.t = now

    def __exit__(self, *exc: object) -> None:
        self._close()
        if self.status is not None:
            self.status.__exit__(*exc)


@contextlib.contextmanager
def _library_output_muted() -> Iterator[None]:
    """transformers' GGUF tensor loop writes a tqdm bar to ``sys.stderr``; melayer reports progress itself."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def _tokenizer_class(config: Any) -> Any:
    """The tokenizer class ``AutoTokenizer`` would pick for this config (None: let AutoTokenizer decide)."""
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING

    try:
        classes = TOKENIZER_MAPPING[type(config)]
    except KeyError:
        return None
    if isinstance(classes, (tuple, list)):
        return classes[1] or classes[0]
    return classes


def _legacy_gguf_arch(arch: str) -> bool:
    """Whether transformers loads the GGUF architecture ``arch`` with its legacy loader (``load_gguf_checkpoint``),
    the one :func:`gguf_state_dict` reproduces; its newer header-based path (a few architectures) is left to it."""
    try:
        from transformers.integrations.gguf.utils import is_gguf_arch_supported
    except ImportError:  # transformers before the header-based path: everything goes through the legacy loader
        return True
    return not is_gguf_arch_supported(arch)


def _check_fits(path: Path, skeleton: Any, header: tuple[dict[str, Any], dict[str, Any], int]) -> None:
    """The weights the model ``skeleton`` (on the meta device) needs cannot outnumber those the file holds."""
    import math

    need = sum(math.prod(shape) for shape in expected_weights(skeleton).values())
    have = sum(math.prod(dims) for dims, _, _ in header[1].values())
    if need > have:
        raise MelayerError(f"{path} describes a model of {need:,} weights but its tensors hold {have:,}: an "
                           "incomplete or inconsistent file")


def gguf_state_dict(path: Path, config: Any, meta: dict[str, Any],
                    header: tuple[dict[str, Any], dict[str, Any], int] | None = None,
                    skeleton: Any = None) -> dict[str, torch.Tensor]:
    """The state dict transformers' legacy GGUF loader builds from ``path`` (its per-architecture tensor processor,
    its GGUF -> transformers key map, gguf's own dequantisation, float32), with the tensors located by melayer's
    header parse (``header``: :func:`melayer.models.gguf_file.read_gguf_header`'s result, read here when not given)
    instead of a second ``gguf.GGUFReader`` pass: that reader builds a NumPy view per vocabulary string, ~8 s for
    Gemma-3's 262k tokens and 515k merges, which ``meta`` (the metadata ``load_gguf_checkpoint`` already returned)
    makes unnecessary. Equal to ``from_pretrained(gguf_file=...)``'s tensors bit for bit (tested)."""
    import numpy as np
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

    info, infos, data_start = header or read_gguf_header(path)
    params = {**meta, "tensors": {}}
    processor = gguf_tensor_processor(str(info.get("general.architecture", "")), params.get("config", {}))
    if skeleton is None:
        with torch.device("meta"):  # only its module names and shapes are needed
            skeleton = AutoModelForCausalLM.from_config(config)
    key_map = get_gguf_hf_weights_map(skeleton, processor)
    for name, (dims, qtype, offset) in infos.items():
        values = read_gguf_tensor(path, dims, qtype, data_start + offset)
        result = processor.process(weights=values, name=name, tensor_key_mapping=key_map, parsed_parameters=params)
        if result.name not in key_map:
            continue
        params["tensors"][key_map[result.name]] = torch.from_numpy(np.copy(result.weights)).to(torch.float32)
    # every weight of the model the metadata describes, in its shape: before the model is allocated
    check_state_dict(path, expected_weights(skeleton), params["tensors"])
    return params["tensors"]


def compact_merges(path: Path) -> bool:
    """Rewrite a BPE ``tokenizer.json``'s merges from ``["a", "b"]`` pairs to ``"a b"`` strings, in place, when
    that is lossless (no merged piece contains a space); returns whether it did.

    Both spellings are the ``tokenizers`` library's own format; the Rust parser reads the string one about a third
    faster (Gemma-3's 515k merges: ~0.35 s of a ~5 s warm start). Lossless is checked, not assumed: the library's
    own serialisation of the rewritten file must reproduce the original file (which transformers wrote with it);
    a file written any other way is left as it is.
    """
    import json

    from tokenizers import Tokenizer

    if not path.exists():
        return False
    text = path.read_text(encoding="utf-8")
    data = json.loads(text)
    merges = data.get("model", {}).get("merges")
    if data["model"].get("type") != "BPE" or not merges or not isinstance(merges[0], list):
        return False
    if any(len(m) != 2 or " " in m[0] or " " in m[1] for m in merges):
        return False
    data["model"]["merges"] = [f"{a} {b}" for a, b in merges]
    new = json.dumps(data, ensure_ascii=False, indent=2)
    if Tokenizer.from_str(new).to_str(pretty=True) != text:  # the library's own (pretty) save of the original
        return False
    path.write_text(new, encoding="utf-8")  # inside the conversion's private temporary directory
    return True


def convert_gguf(path: Path, out: Path, progress: bool = True) -> tuple[Any, Any]:
    """Dequantise ``path`` into the HF directory ``out`` (written atomically); returns (model, tokenizer), ready to use."""
    with path.open("rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise MelayerError(f"{path} is not a GGUF file (bad magic {magic!r})")
    title = f"converting {path.name} once (cached in {out.parent}):" if progress else None
    with _Steps(title) as steps:
        steps.step("reading the GGUF metadata")
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        header = read_gguf_header(path)  # bounds every count and size by the file's size, before gguf's reader
        try:
            meta = load_gguf_checkpoint(str(path), return_tensors=False)
        except Exception as exc:  # the structure is sound (checked above): transformers does not take this model
            raise MelayerError(f"transformers cannot read the model in {path}: {one_line(exc)}") from None
        try:
            config = AutoConfig.for_model(**meta["config"])
            legacy = _legacy_gguf_arch(str(header[0].get("general.architecture", "")))
            with torch.device("meta"):  # no memory: only its module names and shapes are needed
                skeleton = AutoModelForCausalLM.from_config(config)
            if not legacy:  # transformers builds the model before it reads any weight: bound it by the file first
                _check_fits(path, skeleton, header)
            steps.step("rebuilding the tokenizer")
            cls = _tokenizer_class(config)
            if cls is not None:
                tok = cls.from_pretrained(str(path.parent), gguf_file=path.name)
            else:
                tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            steps.step("dequantising the weights")
            with _library_output_muted():
                if legacy:
                    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

                    # transformers annotates every auto mapping's values as the tokenizer mapping's class pair
                    model_class = cast("type[PreTrainedModel]", MODEL_FOR_CAUSAL_LM_MAPPING[type(config)])
                    model = model_class.from_pretrained(
                        None, config=config, dtype=torch.float32,
                        state_dict=gguf_state_dict(path, config, meta, header, skeleton))
                else:  # transformers' own GGUF path for this architecture (packed weights, its header reader)
                    # with output_loading_info transformers returns (model, info); its annotation names the model
                    model, info = cast("tuple[PreTrainedModel, dict[str, Any]]", AutoModelForCausalLM.from_pretrained(
                        str(path.parent), gguf_file=path.name, config=config, dtype=torch.float32,
                        output_loading_info=True))
                    if (error := incomplete(path, info["missing_keys"], mismatched=info["mismatched_keys"])):
                        raise error
        except MelayerError:
            raise
        except Exception as exc:  # any library failure becomes one line
            raise MelayerError(f"transformers could not load {path}: {type(exc).__name__}: {one_line(exc)}") from None
        # the tensors are already dense; drop the GGUF "quantizer" marker so the model can be saved
        drop_gguf_quantizer(model)
        steps.step("saving")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
        try:
            with _library_output_muted():
                model.save_pretrained(tmp)
                tok.save_pretrained(tmp)
            compact_merges(tmp / "tokenizer.json")
            apply_umask(tmp)
            os.replace(tmp, out)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not (out / "config.json").exists():  # else another process has just converted the same file
                raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    model.eval()
    return model, tok


def _file_key(path: Path) -> str:
    import transformers

    st = path.stat()
    raw = f"{path.resolve()}|{st.st_size}|{int(st.st_mtime)}|{transformers.__version__}|{CONVERSION_FORMAT}"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def _finished(out: Path) -> bool:
    """Whether ``out`` is a conversion melayer finished: a directory (not a link to one) of files (none of them
    links) with a config.json. A conversion writes neither kind of link, so one found there was planted."""
    try:
        if not stat.S_ISDIR(os.lstat(out).st_mode):
            return False
        with os.scandir(out) as it:
            entries = list(it)
    except OSError:
        return False
    return any(e.name == "config.json" for e in entries) and not any(e.is_symlink() for e in entries)


def converted(path: Path, progress: bool = True) -> Path:
    """Dequantise a GGUF into a cached HF directory (once) and return that directory."""
    out = cache_dir() / "hf" / f"{path.stem}-{_file_key(path)}"
    if _finished(out):  # converted before from this very file (path, size, mtime)
        return out
    with cache_lock(out):
        if _finished(out):  # another process converted it while this one waited
            return out
        # not a finished conversion: a link planted in its place is removed (not what it points to), and so is a
        # directory holding links or no config.json (only the lock's holder renames a conversion into place)
        if not drop_link(out) and out.is_dir():
            shutil.rmtree(out, ignore_errors=True)
        # a conversion of this file killed before its rename left its private directory: only the lock's holder
        # makes one, so under the lock any that exists is stale
        for stale in out.parent.glob(f"{out.name}.*"):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
        model, _ = convert_gguf(path, out, progress=progress)
    _FRESH[str(out)] = model  # load() takes it instead of reading back what was just written
    return out


_FRESH: dict[str, Any] = {}


def take_fresh(directory: str) -> Any:
    """The model :func:`converted` just built into ``directory`` in this process (once), or None."""
    return _FRESH.pop(directory, None)
