"""Benchmark: ``melayer weights`` throughput (GB of checkpoint per second) against reading the same files.

    .venv/bin/python bench/bench_weights.py [--synthetic-gb 2.4] [--gguf-gb 1.0] [--threads 1 2] [--reps 2]
                                            [--skip-embedded] [--vs-load] [--keep DIR]

Subjects:

* the embedded Gemma-3-270M (GGUF Q4_K_M) and SmolLM2-135M (GGUF Q4_1) files;
* a synthetic Llama-shaped checkpoint of about ``--synthetic-gb`` GB (bfloat16, random weights, sharded
  safetensors with an index);
* a synthetic Llama-shaped GGUF of about ``--gguf-gb`` GB (Q4_K matrices made of random blocks with a fixed
  scale, float32 norms), twice: once saying its tokenizer adds BOS, as Llama's GGUF files do (the ranking follows
  BOS alone), once with no tokenizer (it follows 16 first tokens spread over the vocabulary, as for a model whose
  tokenizer adds no BOS; the synthetic safetensors checkpoint has no tokenizer either).

The synthetic files are written into a temporary directory and deleted afterwards (``--keep DIR``, or the
environment variable ``BENCH_WEIGHTS_DIR``, writes them there and keeps them, reusing what is already there).

Each ranking runs in a fresh process, ``candidates(spec, threads=N)`` twice: the first call includes the lazy
imports (transformers' config defaults and GGUF tensor processors for a GGUF), the second is the streaming alone;
throughput is the checkpoint's size (all its weight files) over the second call. Interleaved with each ranking, a
fresh process reads every byte of the same files (16 MiB reads): the read speed on the same machine at the same
time. Both read through the page cache: the files were just written or read, so both are **warm** numbers (the
cache cannot be dropped without root). On a shared machine only the
ratio of interleaved measurements means much.

``--vs-load`` adds the time and peak memory of loading each safetensors checkpoint with transformers (every
weight touched once) for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

RANK = """
import json, sys, time
import torch
torch.set_num_threads(1)
from melayer.analysis.weights import candidates, _peak_rss_mb
spec, threads = sys.argv[1], int(sys.argv[2])
times = []
for _ in range(2):
    t0 = time.perf_counter()
    r = candidates(spec, threads=threads, progress=False)
    times.append(time.perf_counter() - t0)
print(json.dumps({"first": times[0], "seconds": times[1], "peak_mb": _peak_rss_mb(), "read_mb": r.cost["bytes_read_mb"],
                  "pred": [r.me_layer, r.massive_dim, r.top_neuron]}))
"""

READ = """
import json, os, sys, time
buf = bytearray(16 << 20)
view = memoryview(buf)
t0 = time.perf_counter()
n = 0
for f in sys.argv[1:]:
    fd = os.open(f, os.O_RDONLY)
    try:
        while True:
            k = os.readv(fd, [view])
            if not k:
                break
            n += k
    finally:
        os.close(fd)
print(json.dumps({"seconds": time.perf_counter() - t0, "bytes": n}))
"""

LOAD = """
import json, sys, time
import torch
torch.set_num_threads(1)
from transformers import AutoModelForCausalLM
from melayer.analysis.weights import _peak_rss_mb
t0 = time.perf_counter()
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
with torch.no_grad():  # touch every weight, as a forward pass would (safetensors pages come in lazily)
    total = sum(float(p.float().sum()) for p in m.parameters())
print(json.dumps({"seconds": time.perf_counter() - t0, "peak_mb": _peak_rss_mb()}))
"""


def _run(code: str, *args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "HF_HUB_OFFLINE": "1", "MELAYER_QUIET": "1", "TRANSFORMERS_VERBOSITY": "error"}
    out = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{args[0]} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def weight_files(spec: str) -> list[Path]:
    """The files a checkpoint's weights live in (an embedded name resolves to its GGUF file)."""
    from melayer.models.embedded import EMBEDDED

    if spec in EMBEDDED:
        return [EMBEDDED[spec][1]()]
    path = Path(spec)
    return [path] if path.is_file() else sorted(path.glob("*.safetensors"))


LLAMA = {"hidden": 2048, "inter": 8192, "heads": 16, "kv": 8, "vocab": 32000}


def write_synthetic(path: Path, gb: float) -> Path:
    """A Llama-shaped bfloat16 checkpoint of about ``gb`` GB: config.json, ~0.5 GB shards and their index."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    if (path / "model.safetensors.index.json").exists():
        return path
    s = LLAMA
    per_layer = (2 * s["hidden"] ** 2 + 2 * s["hidden"] ** 2 * s["kv"] // s["heads"] + 3 * s["hidden"] * s["inter"]) * 2
    layers = max(2, int(gb * 1e9 // per_layer))
    cfg = LlamaConfig(hidden_size=s["hidden"], intermediate_size=s["inter"], num_hidden_layers=layers,
                      num_attention_heads=s["heads"], num_key_value_heads=s["kv"], vocab_size=s["vocab"],
                      tie_word_embeddings=False)
    cfg.dtype = "bfloat16"
    path.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(path)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in AutoModelForCausalLM.from_config(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    size = 0

    def flush() -> None:
        nonlocal shard, size
        if shard:
            name = f"model-{len(set(weight_map.values())):05d}.safetensors"
            save_file(shard, str(path / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
            shard, size = {}, 0

    for key, shape in shapes.items():
        if key.endswith("norm.weight"):
            shard[key] = torch.ones(shape, dtype=torch.bfloat16)
        else:
            shard[key] = torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=g)
        size += shard[key].numel() * 2
        if size > 5e8:
            flush()
    flush()
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def write_synthetic_gguf(path: Path, gb: float, bos: bool) -> Path:
    """A Llama-shaped GGUF of about ``gb`` GB: every matrix Q4_K, made of random blocks whose super-block scales
    are fixed (random bytes there could be NaN), norms float32 ones. ``bos``: the file says its tokenizer adds
    BOS (token 1), as Llama's GGUF files do, so the ranking follows BOS alone; without it, it follows BOS-less
    first tokens spread over the vocabulary (16 by default), which costs more arithmetic per byte read."""
    import gguf
    import numpy as np

    if path.exists():
        return path
    s = LLAMA
    block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q4_K]
    shapes = {"attn_q": (s["hidden"], s["hidden"]), "attn_k": (s["hidden"] * s["kv"] // s["heads"], s["hidden"]),
              "attn_v": (s["hidden"] * s["kv"] // s["heads"], s["hidden"]), "attn_output": (s["hidden"], s["hidden"]),
              "ffn_gate": (s["inter"], s["hidden"]), "ffn_up": (s["inter"], s["hidden"]),
              "ffn_down": (s["hidden"], s["inter"])}
    per_layer = sum(a * b for a, b in shapes.values()) * type_size / block
    layers = max(2, int(gb * 1e9 // per_layer))
    rng = np.random.default_rng(0)
    scale = np.array([0.002, 0.0005], dtype=np.float16).view(np.uint8)  # d and dmin of every super-block

    def q4k(rows: int, cols: int) -> np.ndarray:
        raw = rng.integers(0, 256, size=(rows, cols // block, type_size), dtype=np.uint8)
        raw[..., :4] = scale
        return raw.reshape(rows, -1)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(layers)
    w.add_embedding_length(s["hidden"])
    w.add_feed_forward_length(s["inter"])
    w.add_head_count(s["heads"])
    w.add_head_count_kv(s["kv"])
    w.add_context_length(2048)
    w.add_layer_norm_rms_eps(1e-6)
    if bos:
        w.add_bos_token_id(1)
        w.add_add_bos_token(True)
    q = gguf.GGMLQuantizationType.Q4_K
    emb = q4k(s["vocab"], s["hidden"])
    w.add_tensor("token_embd.weight", emb, raw_shape=emb.shape, raw_dtype=q)
    w.add_tensor("output_norm.weight", np.ones(s["hidden"], dtype=np.float32))
    for layer in range(layers):
        for name in ("attn_norm", "ffn_norm"):
            w.add_tensor(f"blk.{layer}.{name}.weight", np.ones(s["hidden"], dtype=np.float32))
        for name, (rows, cols) in shapes.items():
            t = q4k(rows, cols)
            w.add_tensor(f"blk.{layer}.{name}.weight", t, raw_shape=t.shape, raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def measure(label: str, spec: str, threads: list[int], reps: int, rows: list[dict]) -> None:
    files = [str(f) for f in weight_files(spec)]
    gb = sum(os.path.getsize(f) for f in files) / 1e9
    _run(READ, *files)  # into the page cache
    for n in threads:
        ranks, reads = [], []
        for _ in range(reps):  # interleaved: read, rank, read, rank, ...
            reads.append(_run(READ, *files))
            ranks.append(_run(RANK, spec, str(n)))
        read_s = statistics.median(r["seconds"] for r in reads)
        rank_s = statistics.median(r["seconds"] for r in ranks)
        first_s = statistics.median(r["first"] for r in ranks)
        row = {"subject": label, "gb": gb, "threads": n, "first_s": first_s, "seconds": rank_s, "gbps": gb / rank_s,
               "read_mb": ranks[0]["read_mb"], "read_gbps": gb / read_s, "peak_mb": ranks[0]["peak_mb"],
               "pred": ranks[0]["pred"]}
        rows.append(row)
        print(f"| {label} | {gb:.2f} | {row['read_mb'] * 2**20 / 1e9:.2f} | {n} | {first_s:.2f} | {rank_s:.2f} "
              f"| {row['gbps']:.2f} | {row['read_gbps']:.2f} | {row['read_gbps'] / row['gbps']:.1f} "
              f"| {row['peak_mb']:.0f} | {row['pred']} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--synthetic-gb", type=float, default=2.4)
    ap.add_argument("--gguf-gb", type=float, default=1.0)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--skip-embedded", action="store_true")
    ap.add_argument("--vs-load", action="store_true")
    ap.add_argument("--keep", type=Path, default=os.environ.get("BENCH_WEIGHTS_DIR") or None,
                    help="write the synthetic checkpoints here and keep them")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))

    print(f"{os.cpu_count()} CPUs; page cache warm (files read once before timing)")
    print()
    print("| subject | checkpoint GB | GB read by melayer | threads | first call s | repeat s | GB/s | read GB/s "
          "| read / melayer | peak RSS MB | (layer, dim, neuron) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    rows: list[dict] = []
    if not args.skip_embedded:
        for name in ("gemma-3-270m", "smollm2-135m"):
            measure(name, name, args.threads, args.reps, rows)
    with tempfile.TemporaryDirectory(prefix="melayer-bench-weights-") as tmp:
        where = args.keep or Path(tmp)
        if args.synthetic_gb > 0:
            path = write_synthetic(where / f"llama-{args.synthetic_gb}gb-bf16", args.synthetic_gb)
            measure(f"synthetic Llama bf16, {len(weight_files(str(path)))} shards", str(path), args.threads,
                    args.reps, rows)
            if args.vs_load:
                load = _run(LOAD, str(path))
                print(f"\nloading it with transformers (bfloat16, every weight touched): {load['seconds']:.2f} s, "
                      f"peak RSS {load['peak_mb']:.0f} MB")
        if args.gguf_gb > 0:
            for bos in (True, False):
                path = write_synthetic_gguf(where / f"llama-{args.gguf_gb}gb-q4_k{'-bos' if bos else ''}.gguf",
                                            args.gguf_gb, bos)
                label = "BOS: 1 first token" if bos else "no BOS: 16 first tokens"
                measure(f"synthetic Llama GGUF Q4_K ({label})", str(path), args.threads, args.reps, rows)
    print()
    for label in dict.fromkeys(r["subject"] for r in rows if r["subject"].startswith("synthetic")):
        best = max((r for r in rows if r["subject"] == label), key=lambda r: r["gbps"])
        met = best["gbps"] >= 1.0 or best["read_gbps"] / best["gbps"] <= 2.0
        print(f"target >= 1 GB/s of checkpoint or within 2x of reading it, {label}: {best['gbps']:.2f} GB/s "
              f"with {best['threads']} thread(s), reading {best['read_gbps']:.2f} GB/s "
              f"({best['read_gbps'] / best['gbps']:.1f}x): {'met' if met else 'not met'}")

if __name__ == "__main__":
    main()
