"""Reading GGUF files without building a model: a header parse that skips the values melayer does not need
(gguf's own reader builds a Python object per vocabulary entry) and bounds every count and size the file declares
by its real size, single tensors dequantised from a memory map by the ``gguf`` package's quant kernels, and the
integrity checks that turn a damaged file into one line."""

from __future__ import annotations

import functools
import itertools
import math
import re
import struct
import threading
from pathlib import Path
from typing import Any

import numpy as np

from melayer.util.errors import MelayerError

GGUF_MAGIC = b"GGUF"


def read_gguf_tensor(path: Path, dims: tuple[int, ...], qtype: Any, start: int) -> np.ndarray:
    """One tensor of a GGUF file, dequantised to float32 with gguf's values (:func:`gguf_decode`'s own kernels where it
    has one, else ``gguf.quants``), shaped as gguf's own reader shapes it (the GGUF dims reversed). ``start``: its
    absolute byte offset in the file."""
    from gguf.quants import dequantize

    rows = math.prod(dims[1:])
    raw = np.memmap(path, dtype=np.uint8, mode="r", offset=start, shape=(rows, gguf_n_bytes(dims, qtype) // rows))
    if getattr(qtype, "name", "") not in _TORCH_KERNELS:
        return dequantize(raw, qtype).reshape(tuple(reversed(dims)))
    out = np.empty((rows, int(dims[0])), dtype=np.float32)  # decoded a few MiB of blocks at a time
    step = max(1, (1 << 20) // int(dims[0]))
    for first in range(0, rows, step):
        out[first:first + step] = gguf_decode(np.array(raw[first:first + step]), qtype).numpy()
    return out.reshape(tuple(reversed(dims)))


def gguf_rows(path: Path, dims: tuple[int, ...], qtype: Any, start: int, first: int, stop: int) -> Any:
    """Rows ``first .. stop`` of a GGUF tensor (rows of ``dims[0]`` values, as ggml stores them), float32 torch,
    dequantised from the memory map (only those rows' bytes are read; :func:`gguf_decode`)."""
    rows = int(np.prod(dims[1:])) if len(dims) > 1 else 1
    row_bytes = gguf_n_bytes(dims, qtype) // rows
    raw = np.memmap(path, dtype=np.uint8, mode="r", offset=start + first * row_bytes, shape=(stop - first, row_bytes))
    return gguf_decode(np.array(raw), qtype, owned=True)


FLOAT_TYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
_GRID_LOCK = threading.Lock()


def gguf_decode(raw: np.ndarray, qtype: Any, out: Any = None, owned: bool = False) -> Any:
    """Dequantise whole GGUF rows: ``raw`` is a (rows, row bytes) uint8 array of one tensor's stored rows; the
    result is float32 torch (rows, values per row).

    Quantised rows go through ``gguf.quants``' own kernel for the type, applied to all the blocks of ``raw`` at
    once (``dequantize_rows``: vectorised over the blocks, exactly gguf's values). Float rows are viewed in
    place, then converted into ``out`` (a float32 buffer of at least that many values, reused by the caller)
    where given; a float32 view of ``raw`` itself is returned as is unless ``owned``."""
    import torch

    name = getattr(qtype, "name", str(qtype))
    if name in FLOAT_TYPES:
        values = torch.from_numpy(raw.reshape(-1)).view(getattr(torch, FLOAT_TYPES[name])).reshape(raw.shape[0], -1)
        if out is not None:
            return out[: values.numel()].view(values.shape).copy_(values)
        return values.float() if values.dtype != torch.float32 or not owned else values.clone()
    if name in _TORCH_KERNELS:
        size, per_block, decode = _TORCH_KERNELS[name]
        packed = torch.from_numpy(raw).reshape(-1, size)
        n = packed.shape[0] * per_block
        dest = out[:n] if out is not None else torch.empty(n)
        decode(packed, dest.view(packed.shape[0], per_block))
        return dest.view(raw.shape[0], -1)
    if name in _OWN_KERNELS:
        blocks = raw.reshape(-1, _OWN_KERNELS[name][0])
        return torch.from_numpy(_OWN_KERNELS[name][1](blocks).reshape(raw.shape[0], -1))
    import gguf.quants

    kernel = getattr(gguf.quants, name, None)
    if kernel is None or not hasattr(kernel, "dequantize_rows"):
        raise NotImplementedError(f"the gguf package cannot dequantise {name}")
    if getattr(kernel, "grid_hex", None) is not None and getattr(kernel, "grid", None) is None:
        with _GRID_LOCK:  # the i-quant lookup grids are built once, on first use
            kernel.init_grid()
    return torch.from_numpy(kernel.dequantize_rows(raw))


@functools.lru_cache(maxsize=64)
def _nibble_columns(width: int) -> tuple[Any, Any]:
    """The columns of a Q4_K row of ``width`` values held by the low nibbles of its 32-byte groups, and by the high."""
    columns = _torch().arange(width).view(width // 256, 4, 2, 32)
    return columns[:, :, 0].reshape(-1), columns[:, :, 1].reshape(-1)


def gguf_matmul(raw: np.ndarray, qtype: Any, xt: Any, out: Any, buffer: Any) -> None:
    """``out = W @ xt`` where ``raw`` (rows, row bytes) holds the stored rows of ``W`` (float32 ``xt`` (row values,
    tokens), ``out`` (rows, tokens)). Dequantised ``buffer``'s size (a float32 1-D tensor) at a time and multiplied,
    never whole; Q4_K and Q6_K through their own products (:func:`_q4_k_matmul`, :func:`_q6_k_matmul`: exact to
    float32 rounding, not bit for bit the product of gguf's values)."""
    import torch

    rows, name = raw.shape[0], getattr(qtype, "name", str(qtype))
    if buffer.numel() < xt.shape[0]:  # at least one row at a time
        buffer = torch.empty(xt.shape[0])
    own = {"Q4_K": (144, _q4_k_matmul), "Q6_K": (210, _q6_k_matmul)}.get(name)
    if own is not None and raw.shape[1] % own[0] == 0:
        own[1](torch.from_numpy(raw).view(-1, own[0]), rows, xt, out, buffer)
        return
    step = max(1, buffer.numel() // xt.shape[0])
    for first in range(0, rows, step):
        block = gguf_decode(raw[first:first + step], qtype, out=buffer)
        torch.mm(block, xt, out=out[first:first + step])


def _q5_blocks(blocks: np.ndarray, with_min: bool) -> np.ndarray:
    """Q5_0 / Q5_1 blocks (n, 22 or 24 bytes) -> (n, 32) float32, the values ``gguf.quants`` gives bit for bit
    (tested). gguf's kernel widens each block's 32 high bits to a 32-bit word per value; ``np.unpackbits`` reads
    them as bytes, about twice as fast."""
    n = blocks.shape[0]
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    o = 4 if with_min else 2  # after d (and m): qh, 4 bytes, bit j the high bit of value j; then 16 bytes of nibbles
    high = np.unpackbits(blocks[:, o:o + 4], axis=-1, bitorder="little")
    qs = blocks[:, o + 4:]
    q = np.empty((n, 32), dtype=np.uint8)
    np.bitwise_and(qs, 0x0F, out=q[:, :16])
    np.right_shift(qs, 4, out=q[:, 16:])
    q |= high << np.uint8(4)
    if with_min:
        return q.astype(np.float32) * d + blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    return (q.view(np.int8) - np.int8(16)).astype(np.float32) * d


# (bytes per block, kernel): quant types whose blocks melayer decodes itself, faster than gguf's, same values
_OWN_KERNELS = {"Q5_0": (22, lambda b: _q5_blocks(b, False)), "Q5_1": (24, lambda b: _q5_blocks(b, True))}


# The k-quants and the plain 4/8-bit formats, decoded with torch into the caller's float32 buffer: a few whole-array
# passes (unpack the nibbles, widen to float32, scale, offset) instead of gguf's numpy kernels, which build a
# temporary per step. Bit for bit gguf's values (tested on random blocks and on the embedded files' real tensors):
# every product here is exact in float32 (a float16 scale of 11 significant bits times a 6- or 8-bit sub-scale times
# a 4- or 6-bit quant needs at most 24 bits), so the one rounding is the final offset, as in gguf.


def _f16(blocks: Any, start: int) -> Any:
    """The float16 at byte ``start`` of every block, as float32 (n, 1)."""
    return blocks[:, start:start + 2].contiguous().view(_torch().float16).float()


def _nibbles(qs: Any, out: Any) -> None:
    """Bytes (n, g, w) -> (n, g, 2, w) in ``out`` (uint8): low nibbles first, then high, as ggml lays them out.
    Eight bytes at a time, as int64 words (``w`` a multiple of 8)."""
    torch = _torch()
    if qs.storage_offset() % 8 or any(stride % 8 for stride in qs.stride()[:-1]):
        qs = qs.contiguous()  # blocks whose size is not a multiple of 8 bytes
    words = qs.view(torch.int64)
    dest = out.view(torch.int64)
    torch.bitwise_and(words, _LOW_NIBBLES, out=dest[:, :, 0])
    torch.bitwise_and(words >> 4, _LOW_NIBBLES, out=dest[:, :, 1])


_LOW_NIBBLES = 0x0F0F0F0F0F0F0F0F


def _q4_k_scales(words: Any) -> tuple[Any, Any]:
    """The per-sub-block scale ``d * scale`` and offset ``-dmin * min`` (float32 (n, 8) each) of Q4_K blocks seen as
    int64 words (n, 18): d and dmin are float16, the 8 scales and mins 6-bit, packed in 12 bytes."""
    torch = _torch()
    n = words.shape[0]
    head = words[:, :2].contiguous().view(torch.uint8)  # (n, 16): d, dmin, then the 12 bytes of scales and mins
    dm = head.view(torch.float16).float()  # converting the contiguous (n, 8) is 15x faster than its (n, 2) slice
    packed = head[:, 4:].view(torch.int32)
    d, m, md = packed[:, 0], packed[:, 1], packed[:, 2]
    sc = torch.empty(n, 2, dtype=torch.int32)
    mn = torch.empty(n, 2, dtype=torch.int32)
    torch.bitwise_and(d, 0x3F3F3F3F, out=sc[:, 0])  # per byte: the low 6 bits; the high 2 bits of bytes 4-7 below
    torch.bitwise_or(md & 0x0F0F0F0F, (d >> 2) & 0x30303030, out=sc[:, 1])
    torch.bitwise_and(m, 0x3F3F3F3F, out=mn[:, 0])
    torch.bitwise_or((md >> 4) & 0x0F0F0F0F, (m >> 2) & 0x30303030, out=mn[:, 1])
    return sc.view(torch.uint8).float().mul_(dm[:, :1]), mn.view(torch.uint8).float().mul_(dm[:, 1:2]).neg_()


def _words(blocks: Any) -> Any:
    """Blocks (n, bytes) as int64 words (copied first where they do not start on an 8-byte boundary)."""
    if blocks.storage_offset() % 8 or not blocks.is_contiguous():
        blocks = blocks.contiguous()
    return blocks.view(_torch().int64)


def _q4_k(blocks: Any, out: Any) -> None:
    """Q4_K: 144-byte super-blocks of 256 values, 8 sub-blocks of 32 with 6-bit scales and mins. Every step works on
    whole words over arrays as long as the chunk (the block seen as 18 int64 words: 2 of scales, 16 of nibbles),
    with no copy of the nibbles: per-byte views a few bytes wide make torch loop over tiny inner dimensions."""
    torch = _torch()
    n = blocks.shape[0]
    words = _words(blocks)
    scale, offset = _q4_k_scales(words)
    qs = words[:, 2:]  # 4 groups of 32 bytes: the low nibbles are one sub-block, the high the next
    lo = qs & _LOW_NIBBLES
    hi = qs >> 4
    hi &= _LOW_NIBBLES
    o = out.view(n, 4, 2, 32)
    o[:, :, 0].copy_(lo.view(torch.uint8).view(n, 4, 32))
    o[:, :, 1].copy_(hi.view(torch.uint8).view(n, 4, 32))
    o = out.view(n, 8, 32)
    o.mul_(scale.unsqueeze(-1))
    o.add_(offset.unsqueeze(-1))


def _q4_k_matmul(blocks: Any, rows: int, xt: Any, out: Any, buffer: Any) -> None:
    """``out = W @ xt`` for Q4_K rows (``blocks``: their (rows x blocks per row, 144) bytes) without dequantising
    ``W`` whole: the scales and offsets of all the rows are unpacked at once (whole-array operations), then the
    rows' nibbles are unpacked, widened to float32, scaled and multiplied ``buffer``'s size at a time (a block that
    stays in the CPU's cache between those steps). Two passes fewer than dequantising then multiplying: the offsets
    (one per 32 values) enter as ``offsets @ (xt summed over each 32 inputs)``, and each 32-byte group's low nibbles
    (one sub-block) and high nibbles (the next) are widened into two contiguous halves (twice as fast as
    interleaving them), multiplied by ``xt``'s matching rows."""
    torch = _torch()
    n, width = blocks.shape[0], blocks.shape[0] // rows * 256
    words = _words(blocks)
    scale, offset = _q4_k_scales(words)
    torch.mm(offset.view(rows, width // 32), xt.view(width // 32, 32, -1).sum(1), out=out)
    scale = scale.view(n, 4, 2).permute(2, 0, 1).unsqueeze(-1)  # (2, n, 4, 1): low sub-blocks, high (a view:
    # small permuted copies are slow in torch, a broadcast operand's strides cost the multiplication nothing)
    low, high = _nibble_columns(width)
    x_lo, x_hi = xt[low], xt[high]
    qs = words[:, 2:]
    step = max(1, buffer.numel() // width)  # rows per pass
    # the nibbles as _nibbles unpacks them, but into two reused contiguous buffers (its per-call temporary and
    # strided halves cost about 4 % at 16 tokens)
    lo = torch.empty(step * n // rows, 16, dtype=torch.int64)
    hi = torch.empty_like(lo)
    for first in range(0, rows, step):
        last = min(rows, first + step)
        b0, b1 = first * n // rows, last * n // rows
        torch.bitwise_and(qs[b0:b1], _LOW_NIBBLES, out=lo[: b1 - b0])
        torch.bitwise_right_shift(qs[b0:b1], 4, out=hi[: b1 - b0]).bitwise_and_(_LOW_NIBBLES)
        halves = buffer[: 2 * (b1 - b0) * 128].view(2, b1 - b0, 128)
        halves[0].copy_(lo[: b1 - b0].view(torch.uint8).view(-1, 128))
        halves[1].copy_(hi[: b1 - b0].view(torch.uint8).view(-1, 128))
        halves.view(2, b1 - b0, 4, 32).mul_(scale[:, b0:b1])
        part = out[first:last]
        part.addmm_(halves[0].view(last - first, -1), x_lo)
        part.addmm_(halves[1].view(last - first, -1), x_hi)


_BITS_4_5 = 0x3030303030303030


def _q6_k_matmul(blocks: Any, rows: int, xt: Any, out: Any, buffer: Any) -> None:
    """``out = W @ xt`` for Q6_K rows (``blocks``: their (rows x blocks per row, 210) bytes), as
    :func:`_q4_k_matmul`: the constant ``-32`` of every quant enters as ``-32 * d * scale @ (xt summed over each 16
    inputs)``, and each 128-value half's four 32-value quarters are assembled on int64 words (low nibbles from
    ``ql``, two high bits from ``qh``), widened, scaled and multiplied ``buffer``'s size at a time."""
    torch = _torch()
    n, width = blocks.shape[0], blocks.shape[0] // rows * 256
    scale = _f16(blocks, 208) * blocks[:, 192:208].view(torch.int8).float()  # (n, 16): d x the int8 sub-scales
    torch.mm(scale.mul(-32.0).view(rows, width // 16), xt.view(width // 16, 16, -1).sum(1), out=out)
    scale = scale.unsqueeze(-1)
    step = max(1, buffer.numel() // width)
    for first in range(0, rows, step):
        last = min(rows, first + step)
        b0, b1 = first * n // rows, last * n // rows
        nb = b1 - b0
        ql = blocks[b0:b1, :128].contiguous().view(torch.int64).view(nb, 2, 2, 4)  # half, (l | l + 32), words
        qh = blocks[b0:b1, 128:192].contiguous().view(torch.int64).view(nb, 2, 4)  # half, words (2 bits x 4)
        a, b = ql[:, :, 0], ql[:, :, 1]
        quarters = ((a & _LOW_NIBBLES) | ((qh << 4) & _BITS_4_5), (b & _LOW_NIBBLES) | ((qh << 2) & _BITS_4_5),
                    ((a >> 4) & _LOW_NIBBLES) | (qh & _BITS_4_5), ((b >> 4) & _LOW_NIBBLES) | ((qh >> 2) & _BITS_4_5))
        dest = buffer[: nb * 256].view(nb, 2, 4, 32)  # values 128 h + 32 k + l
        for k, quarter in enumerate(quarters):
            dest[:, :, k].copy_(quarter.view(torch.uint8).view(nb, 2, 32))
        dest.view(nb, 16, 16).mul_(scale[b0:b1])
        out[first:last].addmm_(dest.view(last - first, width), xt)


def _q6_k(blocks: Any, out: Any) -> None:
    """Q6_K: 210-byte super-blocks of 256 values: 4 low bits, 2 high bits, 16 int8 scales, a float16 scale."""
    torch = _torch()
    n = blocks.shape[0]
    lo = torch.empty(n, 2, 2, 64, dtype=torch.uint8)
    _nibbles(blocks[:, :128].reshape(n, 2, 64), lo)
    qh = blocks[:, 128:192].reshape(n, 2, 32)
    hi = torch.empty(n, 2, 4, 32, dtype=torch.uint8)
    for k in range(4):
        torch.bitwise_and(qh >> (2 * k), 0x03, out=hi[:, :, k])
    lo.view(n, 256).bitwise_or_(hi.view(n, 256) << 4)
    o = out.view(n, 16, 16)
    o.copy_(lo.view(n, 16, 16)).sub_(32.0)
    o.mul_((_f16(blocks, 208) * blocks[:, 192:208].view(torch.int8).float()).unsqueeze(-1))


def _q8_0(blocks: Any, out: Any) -> None:
    """Q8_0: a float16 scale, 32 int8 values."""
    out.copy_(blocks[:, 2:].view(_torch().int8)).mul_(_f16(blocks, 0))


def _q4_01(blocks: Any, out: Any, with_min: bool) -> None:
    """Q4_0 (a float16 scale, values q - 8) and Q4_1 (scale and minimum, values d q + m): 32 nibbles a block."""
    n = blocks.shape[0]
    q = _torch().empty(n, 1, 2, 16, dtype=_torch().uint8)
    _nibbles(blocks[:, 4 if with_min else 2:].reshape(n, 1, 16), q)  # 16-byte groups: faster than the float route
    out.copy_(q.view(n, 32))
    if with_min:
        out.mul_(_f16(blocks, 0)).add_(_f16(blocks, 2))
    else:
        out.sub_(8.0).mul_(_f16(blocks, 0))


# name -> (bytes per block, values per block, kernel(blocks uint8 (n, bytes), out float32 (n, values)))
_TORCH_KERNELS: dict[str, tuple[int, int, Any]] = {
    "Q4_K": (144, 256, _q4_k), "Q6_K": (210, 256, _q6_k), "Q8_0": (34, 32, _q8_0),
    "Q4_0": (18, 32, lambda b, o: _q4_01(b, o, False)), "Q4_1": (20, 32, lambda b, o: _q4_01(b, o, True)),
}


def _torch() -> Any:
    import torch

    return torch


def gguf_n_bytes(dims: tuple[int, ...], qtype: Any) -> int:
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[qtype]
    return math.prod(dims) * size // block


GGUF_VERSIONS = (2, 3)  # the GGUF format versions melayer reads (version 1 used 32-bit counts and lengths)
GGML_MAX_DIMS = 4  # ggml tensors have at most four dimensions
MAX_ARRAY_NESTING = 8  # arrays of arrays: no real metadata nests more than one level
# metadata counts whose every use builds something of that size: checked to be integers bounded by the file
_BLOCK = re.compile(r"blk\.(\d+)\.")
SHOWN_ABSENT = 4
SIZE_KEYS = ("block_count", "embedding_length", "feed_forward_length", "attention.head_count",
             "attention.head_count_kv", "context_length", "vocab_size", "expert_count")


def read_gguf_header(path: Path) -> tuple[dict[str, Any], dict[str, tuple[tuple[int, ...], Any, int]], int]:
    """(scalar/string metadata, tensor infos name -> (dims, quant type, offset), start of the data section).

    Every count and length the header declares is checked against the bytes actually left in the file before
    anything of that size is read or built, so a small file cannot claim a huge one: a string or array runs past
    the end, more entries than the file can hold, a tensor whose data runs past the end, a size parameter larger
    than the tensors could fill. Each problem is one :class:`MelayerError` naming it; only a file that ends
    early is called truncated."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

    try:
        buf = np.memmap(path, dtype=np.uint8, mode="r")
    except (OSError, ValueError) as exc:
        raise MelayerError(f"cannot read {path}: {exc}") from None
    mv = buf.data  # the file's bytes as a memoryview
    size = len(mv)
    pos = 0

    def bad(what: str) -> MelayerError:
        return MelayerError(f"{path} is not a valid GGUF file: {what}")

    def truncated(what: str) -> MelayerError:
        return MelayerError(f"{path} is a corrupt or truncated GGUF file ({size:,} bytes; {what}): copy or download "
                            "it again")

    def take(fmt: str) -> Any:
        nonlocal pos
        n = struct.calcsize("<" + fmt)
        if pos + n > size:
            raise truncated(f"it ends inside its header, at byte {size:,}")
        vals = struct.unpack_from("<" + fmt, mv, pos)
        pos += n
        return vals[0] if len(vals) == 1 else vals

    def skip(n: int, what: str) -> None:
        nonlocal pos
        if n > size - pos:
            raise truncated(f"{what} of {n:,} bytes runs past the end of the file")
        pos += n

    def string(what: str) -> str:
        n = take("Q")
        start = pos
        skip(n, what)
        return bytes(mv[start:pos]).decode("utf-8", errors="replace")

    # struct codes (little-endian, standard sizes) of the GGUF value types, as the GGUF spec lays them out
    codes = {getattr(GGUFValueType, n): c for n, c in (("UINT8", "B"), ("INT8", "b"), ("UINT16", "H"), ("INT16", "h"),
             ("UINT32", "I"), ("INT32", "i"), ("FLOAT32", "f"), ("BOOL", "?"), ("UINT64", "Q"), ("INT64", "q"),
             ("FLOAT64", "d"))}
    sizes = {t: struct.calcsize("<" + c) for t, c in codes.items()}
    min_size = {**sizes, GGUFValueType.STRING: 8, GGUFValueType.ARRAY: 12}  # fewest bytes one item can take

    def value_type(code: int, key: str) -> Any:
        try:
            return GGUFValueType(code)
        except ValueError:
            raise bad(f"metadata key {key!r} has value type {code}, which is not a GGUF value type") from None

    def value(vtype: Any, key: str, depth: int = 0) -> Any:
        nonlocal pos
        if vtype == GGUFValueType.STRING:
            return string(f"the string value of {key!r}")
        if vtype == GGUFValueType.ARRAY:
            if depth >= MAX_ARRAY_NESTING:
                raise bad(f"metadata key {key!r} nests arrays more than {MAX_ARRAY_NESTING} deep")
            itype, count = value_type(take("I"), key), take("Q")
            if count * min_size[itype] > size - pos:
                raise truncated(f"the metadata value {key!r} claims {count:,} items, more than the rest of the "
                                "file holds")
            if itype == GGUFValueType.STRING:  # skip: only lengths are read (a tight loop: vocabularies are long)
                pos = _skip_strings(mv, pos, count, size, lambda n: truncated(
                    f"a string in the metadata value {key!r} of {n:,} bytes runs past the end of the file"))
            elif itype == GGUFValueType.ARRAY:
                for _ in range(count):
                    value(itype, key, depth + 1)
            else:
                skip(sizes[itype] * count, f"the metadata value {key!r}")
            return None
        return take(codes[vtype])

    if bytes(mv[:4]) != b"GGUF":
        raise MelayerError(f"{path} is not a GGUF file (bad magic {bytes(mv[:4])!r})")
    pos = 4
    version = take("I")
    if version not in GGUF_VERSIONS:
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        hint = " (a big-endian GGUF file? melayer reads little-endian ones)" if swapped in GGUF_VERSIONS else ""
        raise MelayerError(f"{path}: GGUF version {version} is not supported{hint}; melayer reads GGUF versions "
                           f"{' and '.join(map(str, GGUF_VERSIONS))}")
    n_tensors, n_kv = take("Q"), take("Q")
    # the smallest metadata entry is 13 bytes (key length, value type, one byte); the smallest tensor entry 32
    if n_kv * 13 + n_tensors * 32 > size - pos:
        raise truncated(f"its header claims {n_kv:,} metadata entries and {n_tensors:,} tensors, more than the "
                        "file can hold")
    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key = string("a metadata key")
        if key in meta:
            raise bad(f"metadata key {key!r} appears twice")
        meta[key] = value(value_type(take("I"), key), key)
    infos: dict[str, tuple[tuple[int, ...], Any, int]] = {}
    for _ in range(n_tensors):
        name = string("a tensor name")
        n_dims = take("I")
        if not 1 <= n_dims <= GGML_MAX_DIMS:
            raise bad(f"tensor {name!r} has {n_dims} dimensions (ggml tensors have 1 to {GGML_MAX_DIMS})")
        dims = tuple(int(take("Q")) for _ in range(n_dims))
        code = take("I")
        try:
            qtype = GGMLQuantizationType(code)
            block, _ = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise MelayerError(f"{path}: tensor {name!r} has quant type {code}, which the installed gguf package "
                               "does not know (a newer GGUF file? upgrade the gguf package)") from None
        if dims[0] % block:
            raise bad(f"tensor {name!r} has a first dimension of {dims[0]}, not a multiple of its quant type "
                      f"{qtype.name}'s block of {block}")
        if name in infos:
            raise bad(f"tensor {name!r} appears twice in the tensor table")
        infos[name] = (dims, qtype, int(take("Q")))
    align = meta.get("general.alignment", 32)
    if type(align) is not int or align <= 0 or align & (align - 1) or align > 1 << 30:
        raise bad(f"general.alignment is {align!r}; it must be a power of two")
    data_start = (pos + align - 1) // align * align
    for name, (dims, qtype, offset) in infos.items():
        if offset % align:
            raise bad(f"tensor {name!r} starts at offset {offset}, not a multiple of the alignment {align}")
        if data_start + offset + gguf_n_bytes(dims, qtype) > size:
            raise truncated(f"tensor {name!r} runs past the end of the file")
    _check_sizes(path, meta, infos)
    return meta, infos, data_start


def _check_sizes(path: Path, meta: dict[str, Any], infos: dict[str, tuple[tuple[int, ...], Any, int]]) -> None:
    """The model-size parameters must be whole numbers no larger than the tensors present could fill: a model is
    built (or its layers enumerated) from them before any tensor is read."""
    arch = meta.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise MelayerError(f"{path} is not a valid GGUF file: general.architecture is {arch!r}, not a name")
    if not infos:
        raise MelayerError(f"{path} holds no tensors (metadata only): there are no weights to read")
    blocks = meta.get(f"{arch}.block_count")
    if type(blocks) is int and blocks > 0:  # llama.cpp names a decoder block's tensors blk.N.*: each needs some
        present = {int(m.group(1)) for name in infos if (m := _BLOCK.match(name))}
        n_absent = blocks - len({i for i in present if i < blocks})
        if n_absent:
            first = list(itertools.islice((i for i in range(blocks) if i not in present), SHOWN_ABSENT))
            listed = ", ".join(f"blk.{i}" for i in first) + (", ..." if n_absent > len(first) else "")
            raise MelayerError(f"{path} declares {blocks:,} decoder blocks ({arch}.block_count) but holds no tensors "
                               f"for {n_absent:,} of them ({listed}): an incomplete file")
    elements = sum(math.prod(dims) for dims, _, _ in infos.values())
    for suffix in SIZE_KEYS:
        key = f"{arch}.{suffix}"
        v = meta.get(key)
        if v is None:
            continue
        if type(v) is not int or v < 0:
            raise MelayerError(f"{path} is not a valid GGUF file: {key} is {v!r}, not a whole number")
        if v > elements:
            raise MelayerError(f"{path} is not a valid GGUF file: {key} is {v:,}, more than the {elements:,} "
                               "weights in its tensors")


def _skip_strings(mv: memoryview, pos: int, count: int, size: int, too_long: Any) -> int:
    """The position after ``count`` GGUF strings (u64 length, bytes) starting at ``pos``; ``too_long(n)`` is
    raised for a length that runs past ``size``."""
    unpack = struct.Struct("<Q").unpack_from
    for _ in range(count):
        if pos + 8 > size:
            raise too_long(8)
        n = unpack(mv, pos)[0]
        pos += 8
        if n > size - pos:
            raise too_long(n)
        pos += n
    return pos


def check_gguf(path: Path) -> None:
    """Integrity check of a GGUF file before anything is built from it: the header parse, which bounds every count
    and size by the file's real size (:func:`read_gguf_header`)."""
    read_gguf_header(path)
