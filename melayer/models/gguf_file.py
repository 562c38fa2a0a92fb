"""Reading GGUF files without building a model: a header parse that skips the values melayer does not need
(gguf's own reader builds a Python object per vocabulary entry), single tensors dequantised from a memory map by
the ``gguf`` package's quant kernels, and the integrity checks that turn a damaged file into one line."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np

from melayer.util.errors import MelayerError

GGUF_MAGIC = b"GGUF"


def read_gguf_tensor(path: Path, dims: tuple[int, ...], qtype: Any, start: int) -> np.ndarray:
    """One tensor of a GGUF file, dequantised by ``gguf.quants`` (float32), shaped as gguf's own reader shapes it
    (the GGUF dims reversed). ``start``: its absolute byte offset in the file."""
    from gguf.quants import dequantize

    rows = int(np.prod(dims[1:])) if len(dims) > 1 else 1
    raw = np.memmap(path, dtype=np.uint8, mode="r", offset=start, shape=(rows, gguf_n_bytes(dims, qtype) // rows))
    return dequantize(raw, qtype).reshape(tuple(reversed(dims)))


def gguf_n_bytes(dims: tuple[int, ...], qtype: Any) -> int:
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[qtype]
    return int(np.prod(dims)) * size // block


def read_gguf_header(path: Path) -> tuple[dict[str, Any], dict[str, tuple[tuple[int, ...], Any, int]], int]:
    """(scalar/string metadata, tensor infos name -> (dims, quant type, offset), start of the data section)."""
    from gguf import GGMLQuantizationType, GGUFValueType

    try:
        buf = np.memmap(path, dtype=np.uint8, mode="r")
    except (OSError, ValueError) as exc:
        raise MelayerError(f"cannot read {path}: {exc}") from None
    mv = memoryview(buf)
    pos = 0

    def take(fmt: str) -> Any:
        nonlocal pos
        vals = struct.unpack_from("<" + fmt, mv, pos)
        pos += struct.calcsize("<" + fmt)
        return vals[0] if len(vals) == 1 else vals

    def string() -> str:
        nonlocal pos
        n = take("Q")
        s = bytes(mv[pos:pos + n]).decode("utf-8", errors="replace")
        pos += n
        return s

    # struct codes (little-endian, standard sizes) of the GGUF value types, as the GGUF spec lays them out
    codes = {getattr(GGUFValueType, n): c for n, c in (("UINT8", "B"), ("INT8", "b"), ("UINT16", "H"), ("INT16", "h"),
             ("UINT32", "I"), ("INT32", "i"), ("FLOAT32", "f"), ("BOOL", "?"), ("UINT64", "Q"), ("INT64", "q"),
             ("FLOAT64", "d"))}
    sizes = {t: struct.calcsize("<" + c) for t, c in codes.items()}

    def value(vtype: Any) -> Any:
        nonlocal pos
        if vtype == GGUFValueType.STRING:
            return string()
        if vtype == GGUFValueType.ARRAY:
            itype, count = GGUFValueType(take("I")), take("Q")
            if itype == GGUFValueType.STRING:
                for _ in range(count):  # skip: only lengths are read
                    n = take("Q")
                    pos += n
            elif itype == GGUFValueType.ARRAY:
                for _ in range(count):
                    value(itype)
            else:
                pos += sizes[itype] * count
            return None
        return take(codes[vtype])

    try:
        if bytes(mv[:4]) != b"GGUF":
            raise MelayerError(f"{path} is not a GGUF file (bad magic {bytes(mv[:4])!r})")
        pos = 4
        version = take("I")
        if version < 2:
            raise MelayerError(f"{path}: GGUF version {version} is not supported")
        n_tensors, n_kv = take("Q"), take("Q")
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = string()
            meta[key] = value(GGUFValueType(take("I")))
        infos = {}
        for _ in range(n_tensors):
            name = string()
            n_dims = take("I")
            dims = tuple(int(take("Q")) for _ in range(n_dims))
            qtype = GGMLQuantizationType(take("I"))
            infos[name] = (dims, qtype, int(take("Q")))
    except MelayerError:
        raise
    except (struct.error, ValueError, KeyError) as exc:
        raise MelayerError(f"{path} is a corrupt or truncated GGUF file ({type(exc).__name__}: {exc})") from None
    align = int(meta.get("general.alignment") or 32)
    return meta, infos, (pos + align - 1) // align * align


def check_gguf(path: Path) -> None:
    """Cheap integrity check before handing a GGUF to transformers: magic and a full header parse."""
    try:
        with path.open("rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise MelayerError(f"cannot read {path}: {exc}") from None
    if magic != GGUF_MAGIC:
        raise MelayerError(f"{path} is not a GGUF file (bad magic {magic!r})")
    size = path.stat().st_size
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        need = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    except Exception:
        raise damaged_gguf(path) from None
    if need > size:
        raise MelayerError(f"{path} is a corrupt or truncated GGUF file ({size:,} bytes; its tensors need "
                           f"{need:,}): copy or download it again")


def damaged_gguf(path: Path) -> MelayerError:
    """The one line for a GGUF whose header or tensor table does not parse (gguf's own errors are numpy
    internals such as 'cannot reshape array')."""
    size = path.stat().st_size
    return MelayerError(f"{path} is a corrupt or truncated GGUF file ({size:,} bytes; it ends inside, or does not "
                        "match, the header and tensor data it declares): copy or download it again")
