"""Effective forward FLOP rate of this machine: SmolLM2-135M, float32, one batch of 8 x 128 tokens, best of 3.

FLOPs are counted as 2 x parameters per token (every matmul, the tied LM head included; attention adds a few
percent at this length), which is the count the README's 7B time estimates use.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_flops.py [--threads 1] [--model smollm2-135m]
"""

from __future__ import annotations

import argparse
import time

import torch

import melayer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = melayer.load(args.model, progress=False)
    params = sum(p.numel() for p in lm.model.parameters())  # tied weights counted once ...
    head = lm.model.get_output_embeddings()
    tied = head is not None and head.weight is lm.model.get_input_embeddings().weight
    embed = lm.model.get_input_embeddings().weight.numel()
    # ... the input embedding is a lookup (no FLOPs), the LM head a matmul: count the head, not the lookup
    matmul_params = params - (0 if tied else embed)
    ids = torch.randint(100, 20000, (args.batch, args.tokens))
    times = []
    with torch.no_grad():
        lm.model(ids[:1, :16])
        for _ in range(3):
            t0 = time.perf_counter()
            lm.model(ids)
            times.append(time.perf_counter() - t0)
    n_tok, best = ids.numel(), min(times)
    print(f"{args.model}: {matmul_params / 1e6:.1f}M matmul parameters, {n_tok} tokens, "
          f"times {[round(t, 2) for t in times]} s, best {best:.2f} s: {n_tok / best:.1f} tokens/s, "
          f"{2 * matmul_params * n_tok / best / 1e9:.1f} GFLOP/s ({args.threads} thread(s))")


if __name__ == "__main__":
    main()
