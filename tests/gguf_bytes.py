"""Build GGUF files byte by byte, malformed on purpose: every field is written as given, nothing is checked.

The hostile-input tests generate their damaged GGUFs with this (no binary fixtures): a header of
``(key, value type, value)`` entries and a tensor table of ``(name, dims, quant type, offset)`` rows, laid out as
the GGUF spec lays them (little-endian; strings as a u64 length + bytes; arrays as item type + u64 count + items).
"""

from __future__ import annotations

import struct
from typing import Any

# GGUF value types (the spec's numbering)
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)
_CODES = {UINT8: "B", INT8: "b", UINT16: "H", INT16: "h", UINT32: "I", INT32: "i", FLOAT32: "f", BOOL: "?",
          UINT64: "Q", INT64: "q", FLOAT64: "d"}
F32 = 0  # GGML quant type F32


def string(s: str | bytes, length: int | None = None) -> bytes:
    raw = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(raw) if length is None else length) + raw


def value(vtype: int, v: Any) -> bytes:
    """A value's bytes. ARRAY takes ``(item type, items)`` or ``(item type, items, claimed count)``; items of an
    ARRAY of ARRAYs are themselves ``(item type, items)`` pairs."""
    if vtype == STRING:
        return string(v)
    if vtype == ARRAY:
        itype, items, *claimed = v
        count = claimed[0] if claimed else len(items)
        return struct.pack("<IQ", itype, count) + b"".join(value(itype, i) for i in items)
    return struct.pack("<" + _CODES[vtype], v)


def kv(key: str, vtype: int, v: Any) -> bytes:
    return string(key) + struct.pack("<I", vtype) + value(vtype, v)


def tensor_info(name: str, dims: tuple[int, ...], qtype: int = F32, offset: int = 0) -> bytes:
    return string(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims) + \
        struct.pack("<IQ", qtype, offset)


def gguf(kvs: list[bytes], tensors: list[bytes], *, version: int = 3, n_tensors: int | None = None,
         n_kv: int | None = None, data: bytes = b"", align: int = 32) -> bytes:
    """A whole file: magic, version, counts (the real ones unless given), the entries, padding, ``data``."""
    head = b"GGUF" + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                                 len(kvs) if n_kv is None else n_kv) + b"".join(kvs) + b"".join(tensors)
    return head + b"\0" * (-len(head) % align) + data


def llama_kvs(block_count: Any = 1, block_type: int = UINT32, arch: str = "llama", embd: int = 8) -> list[bytes]:
    """The metadata of a small Llama (the keys transformers' GGUF config reader needs), with a tokenizer."""
    tokens = ["<unk>", "<s>", "</s>", *[chr(c) for c in range(97, 97 + 13)]]
    return [kv("general.architecture", STRING, arch), kv("general.name", STRING, "hostile"),
            kv(f"{arch}.block_count", block_type, block_count), kv(f"{arch}.context_length", UINT32, 64),
            kv(f"{arch}.embedding_length", UINT32, embd), kv(f"{arch}.feed_forward_length", UINT32, 16),
            kv(f"{arch}.attention.head_count", UINT32, 2), kv(f"{arch}.attention.head_count_kv", UINT32, 2),
            kv(f"{arch}.attention.layer_norm_rms_epsilon", FLOAT32, 1e-5), kv(f"{arch}.rope.dimension_count", UINT32, 4),
            kv("tokenizer.ggml.model", STRING, "gpt2"), kv("tokenizer.ggml.tokens", ARRAY, (STRING, tokens)),
            kv("tokenizer.ggml.token_type", ARRAY, (INT32, [3, 3, 3] + [1] * 13)),
            kv("tokenizer.ggml.merges", ARRAY, (STRING, [])),
            kv("tokenizer.ggml.bos_token_id", UINT32, 1), kv("tokenizer.ggml.eos_token_id", UINT32, 2)]


def tensors(arrays: dict[str, Any], align: int = 32) -> tuple[list[bytes], bytes]:
    """Tensor-table rows and the data section for float32 ``arrays`` (numpy, HF order: GGUF dims are reversed)."""
    import numpy as np

    infos, data = [], b""
    for name, a in arrays.items():
        raw = np.ascontiguousarray(a, dtype=np.float32).tobytes()
        infos.append(tensor_info(name, tuple(reversed(a.shape)), F32, len(data)))
        data += raw + b"\0" * (-len(raw) % align)
    return infos, data


def tiny_llama_arrays(n_layers: int = 1, embd: int = 8, ff: int = 16, vocab: int = 16, seed: int = 0) -> dict[str, Any]:
    """The tensors of a small Llama under their GGUF names, random float32 (HF (out, in) order)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = {"token_embd.weight": rng.standard_normal((vocab, embd)), "output_norm.weight": np.ones(embd),
           "output.weight": rng.standard_normal((vocab, embd))}
    for i in range(n_layers):
        out.update({f"blk.{i}.attn_norm.weight": np.ones(embd), f"blk.{i}.ffn_norm.weight": np.ones(embd),
                    f"blk.{i}.attn_q.weight": rng.standard_normal((embd, embd)),
                    f"blk.{i}.attn_k.weight": rng.standard_normal((embd, embd)),
                    f"blk.{i}.attn_v.weight": rng.standard_normal((embd, embd)),
                    f"blk.{i}.attn_output.weight": rng.standard_normal((embd, embd)),
                    f"blk.{i}.ffn_gate.weight": rng.standard_normal((ff, embd)),
                    f"blk.{i}.ffn_up.weight": rng.standard_normal((ff, embd)),
                    f"blk.{i}.ffn_down.weight": rng.standard_normal((embd, ff))})
    return out


def tiny_llama(n_layers: int = 1, drop: tuple[str, ...] = (), reshape: dict[str, tuple[int, ...]] | None = None,
               **kvs_args: Any) -> bytes:
    """A complete small Llama GGUF; ``drop`` leaves tensors out, ``reshape`` gives some a wrong shape."""
    import numpy as np

    arrays = {k: v for k, v in tiny_llama_arrays(n_layers).items() if k not in drop}
    for k, shape in (reshape or {}).items():
        arrays[k] = np.zeros(shape)
    infos, data = tensors(arrays)
    return gguf(llama_kvs(block_count=n_layers, **kvs_args), infos, data=data)


def nested_array(depth: int) -> bytes:
    """A metadata value: ``depth`` arrays each holding one array, the innermost empty (built without recursion)."""
    return struct.pack("<IQ", ARRAY, 1) * (depth - 1) + struct.pack("<IQ", UINT8, 0)


def catalogue() -> dict[str, tuple[bytes, str]]:
    """Malformed GGUFs: name -> (file bytes, a phrase the one-line error must contain)."""
    import math

    ok_infos, ok_data = tensors(tiny_llama_arrays(1))
    base = llama_kvs()

    def with_kv(*extra: bytes, **kw: Any) -> bytes:
        return gguf(base + list(extra), ok_infos, data=ok_data, **kw)

    def with_tensor(info: bytes) -> bytes:
        return gguf(base, ok_infos + [info], data=ok_data)

    nested_kv = string("x.nested") + struct.pack("<I", ARRAY) + nested_array(1000)
    huge_str_kv = string("general.description") + struct.pack("<I", STRING) + struct.pack("<Q", 2**63) + b"abc"
    block_names = tuple(k for k in tiny_llama_arrays(2) if k.startswith("blk.1."))
    return {
        "no tensors": (gguf(base, []), "holds no tensors"),
        "a layer tensor missing": (tiny_llama(2, drop=("blk.1.ffn_up.weight",)), "model.layers.1.mlp.up_proj.weight"),
        "a whole block missing": (tiny_llama(2, drop=block_names), "no tensors for 1 of them (blk.1)"),
        "a million blocks claimed": (gguf(llama_kvs(block_count=10**6), ok_infos, data=ok_data),
                                     "declares 1,000,000 decoder blocks"),
        "a 2^62-item UINT8 array": (with_kv(kv("x.bomb", ARRAY, (UINT8, [], 2**62))), "claims 4,611,686,018,427,387,904"),
        "a 2^63-byte string": (with_kv(huge_str_kv), "runs past the end"),
        "arrays nested 1000 deep": (with_kv(nested_kv), "nests arrays more than"),
        "alignment as a string": (with_kv(kv("general.alignment", STRING, "32")), "general.alignment is '32'"),
        "alignment NaN": (with_kv(kv("general.alignment", FLOAT32, math.nan)), "general.alignment is nan"),
        "alignment inf": (with_kv(kv("general.alignment", FLOAT64, math.inf)), "general.alignment is inf"),
        "alignment 0": (with_kv(kv("general.alignment", UINT32, 0)), "power of two"),
        "alignment 3": (with_kv(kv("general.alignment", UINT32, 3)), "power of two"),
        "block_count as a string": (gguf(llama_kvs(block_count="1", block_type=STRING), ok_infos, data=ok_data),
                                    "llama.block_count is '1', not a whole number"),
        "block_count as a float": (gguf(llama_kvs(block_count=1.0, block_type=FLOAT32), ok_infos, data=ok_data),
                                   "not a whole number"),
        "block_count negative": (gguf(llama_kvs(block_count=-1, block_type=INT32), ok_infos, data=ok_data),
                                 "not a whole number"),
        "embedding_length a billion": (gguf(llama_kvs(embd=10**9), ok_infos, data=ok_data),
                                       "embedding_length is 1,000,000,000"),
        "dims whose product wraps to 0": (with_tensor(tensor_info("x.wrap", (2**32, 2**32))), "runs past the end"),
        "a tensor of the wrong shape": (tiny_llama(1, reshape={"blk.0.ffn_down.weight": (8, 7)}), "mismatched"),
        "unknown architecture": (gguf(llama_kvs(arch="notanarch"), ok_infos, data=ok_data), "notanarch"),
        "architecture not a string": (gguf([kv("general.architecture", UINT32, 7)] + base[1:], ok_infos, data=ok_data),
                                      "general.architecture is 7"),
        "GGUF version 99": (with_kv(version=99), "GGUF version 99 is not supported"),
        "GGUF version 1": (with_kv(version=1), "GGUF version 1 is not supported"),
        "big-endian GGUF": (with_kv(version=3 << 24), "a big-endian GGUF file"),
        "unknown quant type": (with_tensor(tensor_info("x.q", (32,), 999)), "quant type 999"),
        "quant block not filled": (with_tensor(tensor_info("x.q", (7,), 2)), "not a multiple of its quant type Q4_0"),
        "duplicate tensor names": (gguf(base, ok_infos + ok_infos[-1:], data=ok_data), "appears twice in the tensor"),
        "duplicate metadata keys": (with_kv(base[1]), "'general.name' appears twice"),
        "2^60 metadata entries": (with_kv(n_kv=2**60), "claims 1,152,921,504,606,846,976 metadata entries"),
        "2^60 tensors": (with_kv(n_tensors=2**60), "1,152,921,504,606,846,976 tensors, more than"),
        "unknown value type": (with_kv(string("x.odd") + struct.pack("<I", 99)), "value type 99"),
        "a tensor of 0 dimensions": (with_tensor(tensor_info("x.d0", ())), "has 0 dimensions"),
        "a tensor of 9 dimensions": (with_tensor(tensor_info("x.d9", (1,) * 9)), "has 9 dimensions"),
        "an unaligned tensor offset": (with_tensor(tensor_info("x.off", (8,), 0, 3)), "not a multiple of the alignment"),
        "a tensor past the end": (with_tensor(tensor_info("x.far", (8,), 0, 2**40)), "runs past the end"),
        "cut inside the data": (tiny_llama(1)[:-40], "truncated"),
        "cut inside the header": (tiny_llama(1)[:300], "truncated"),
        "bad magic": (b"GGUX" + tiny_llama(1)[4:], "not a GGUF file"),
        "an empty file": (b"", "cannot read"),
        "a 2^63-element tensor": (with_tensor(tensor_info("x.big", (2**63,))), "runs past the end"),
    }
