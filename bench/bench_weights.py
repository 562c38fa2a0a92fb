"""Benchmark: ranking ME-layer candidates from the weights vs loading the model with transformers.

    .venv/bin/python bench/bench_weights.py [--synthetic-gb 2.4] [--skip-embedded] [--reps 1]

Each measurement runs in a fresh Python process: the time of the operation itself (imports excluded) and the
process's peak RSS (VmHWM), with the peak after the imports for reference. Subjects:

* the embedded Gemma-3-270M and SmolLM2-135M: ranked from the original GGUF file and from melayer's
  dequantised safetensors cache; loaded with ``AutoModelForCausalLM.from_pretrained`` (float32, as
  ``melayer.load`` does) from that cache, then every weight touched once (a sum), as a forward pass would:
  transformers maps safetensors files lazily, so an untouched model is not yet in memory;
* a synthetic Llama-shaped checkpoint of about ``--synthetic-gb`` GB (bfloat16, random weights, sharded
  safetensors) written by this script into a temporary directory and deleted afterwards; loaded in bfloat16.
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

MEASURE = """
import json, sys, time
import torch
torch.set_num_threads(1)
from melayer.analysis.weights import candidates, _peak_rss_mb
from transformers import AutoModelForCausalLM
what, spec, dtype = sys.argv[1], sys.argv[2], sys.argv[3]
base = _peak_rss_mb()
t0 = time.perf_counter()
if what == "rank":
    r = candidates(spec)
    info = {"me_layer": r.me_layer, "dim": r.massive_dim, "neuron": r.top_neuron}
else:
    m = AutoModelForCausalLM.from_pretrained(spec, dtype=getattr(torch, dtype))
    with torch.no_grad():  # touch every weight, as a forward pass would (safetensors pages come in lazily)
        info = {"params": sum(p.numel() for p in m.parameters()), "checksum": sum(float(p.float().sum()) for p in m.parameters())}
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "peak_mb": _peak_rss_mb(), "base_mb": base, **info}))
"""


def measure(what: str, spec: str, dtype: str = "float32") -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "HF_HUB_OFFLINE": "1", "MELAYER_QUIET": "1", "TRANSFORMERS_VERBOSITY": "error"}
    out = subprocess.run([sys.executable, "-c", MEASURE, what, spec, dtype], env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{what} {spec} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_synthetic(path: Path, gb: float) -> tuple[Path, float]:
    """A Llama-shaped bfloat16 checkpoint of about ``gb`` GB: config.json, shards and index."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    hidden, inter, heads, kv = 2048, 8192, 16, 8
    per_layer = (2 * hidden * hidden + 2 * hidden * hidden * kv // heads + 3 * hidden * inter) * 2
    layers = max(2, int(gb * 1e9 // per_layer))
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, vocab_size=32000, tie_word_embeddings=False)
    cfg.dtype = "bfloat16"
    path.mkdir(parents=True)
    cfg.save_pretrained(path)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in AutoModelForCausalLM.from_config(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    weight_map, shard, size, index = {}, {}, 0, 0

    def flush() -> None:
        nonlocal shard, size, index
        if shard:
            name = f"model-{index:05d}.safetensors"
            save_file(shard, str(path / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
            shard, size, index = {}, 0, index + 1

    for key, shape in shapes.items():
        t = torch.ones(shape) if key.endswith("norm.weight") else torch.randn(shape, generator=g) * 0.02
        shard[key] = t.to(torch.bfloat16)
        size += shard[key].numel() * 2
        if size > 5e8:
            flush()
    flush()
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    total = sum(f.stat().st_size for f in path.glob("*.safetensors")) / 1e9
    return path, total


def row(label: str, what: str, spec: str, reps: int, dtype: str = "float32") -> dict:
    runs = [measure(what, spec, dtype) for _ in range(reps)]
    best = {k: statistics.median(r[k] for r in runs) if isinstance(runs[0][k], float) else runs[0][k] for k in runs[0]}
    extra = {k: v for k, v in best.items() if k not in ("seconds", "peak_mb", "base_mb")}
    print(f"| {label} | {best['seconds']:.2f} | {best['peak_mb']:.0f} | {best['base_mb']:.0f} | {extra} |", flush=True)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--synthetic-gb", type=float, default=2.4)
    ap.add_argument("--skip-embedded", action="store_true")
    ap.add_argument("--reps", type=int, default=1)
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from melayer.models.loading import resolve_source

    print("| subject | seconds | peak RSS MB | peak RSS after imports MB | result |")
    print("|---|---|---|---|---|")
    ratios = []
    if not args.skip_embedded:
        for name in ("gemma-3-270m", "smollm2-135m"):
            cache = resolve_source(name)[1]
            load = row(f"{name}: load with transformers (float32)", "load", cache, args.reps)
            rank = row(f"{name}: rank from the GGUF file", "rank", name, args.reps)
            rank_st = row(f"{name}: rank from the safetensors cache", "rank", cache, args.reps)
            ratios.append((name, load, rank, rank_st))
    if args.synthetic_gb > 0:
        with tempfile.TemporaryDirectory(prefix="melayer-bench-weights-") as tmp:
            path, total = write_synthetic(Path(tmp) / "synthetic", args.synthetic_gb)
            label = f"synthetic Llama {total:.2f} GB bf16"
            load = row(f"{label}: load with transformers (bfloat16)", "load", str(path), args.reps, "bfloat16")
            rank = row(f"{label}: rank", "rank", str(path), args.reps)
            ratios.append((label, load, rank, None))
    print()
    for name, load, rank, rank_st in ratios:
        text = (f"{name}: rank/load time {rank['seconds'] / load['seconds']:.2f}, "
                f"RSS growth rank {rank['peak_mb'] - rank['base_mb']:.0f} MB vs load {load['peak_mb'] - load['base_mb']:.0f} MB")
        if rank_st:
            text += f"; from safetensors: time ratio {rank_st['seconds'] / load['seconds']:.2f}"
        print(text)


if __name__ == "__main__":
    main()
