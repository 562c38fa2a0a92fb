"""Streaming reduction of decoder-layer outputs for the scan: a few numbers per layer and prompt.

Per layer and row (prompt) it keeps the median |a| over the row's real tokens x dims, the ``top_k`` largest
|a| entries, every entry above the row's cutoff ``max(abs_min, median_ratio x median)`` (at most
``max_massive``), the |a| rows of the ``n_candidates`` tokens with the largest |a| plus the first real token,
and the values of every (position, dim) found massive at an earlier layer.

Cost: everything is found from the per-token maximum |a| (one pass over the layer output): the top entries
and the massive ones can only sit in the tokens whose maximum is large enough, so the full-size
``topk``/comparison passes run over those few tokens only, and the median is a linear-time selection
(``numpy.partition`` on a CPU). Positions are relative to each row's first real token (rows are left padded),
and nothing a row gets depends on the other rows of its batch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from melayer.util.errors import NumericOverflow


def layer_output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def lower_median(x: torch.Tensor) -> float:
    """``torch.median`` of a 1-D tensor (the lower of the two middle values), in linear time on a CPU."""
    if x.device.type != "cpu":
        return float(x.median())
    arr = x.numpy()
    k = (arr.size - 1) // 2
    return float(np.partition(arr, k)[k])


class LayerReducer:
    """Forward hooks that reduce each decoder layer's output to ``per_row[row][layer]`` dicts with keys
    ``median``, ``top``, ``massive`` (lists of (signed value, position, dim), largest |a| first), ``rows``
    (position -> |a| over dims, numpy) and ``watched`` ((position, dim) -> value)."""

    def __init__(self, *, median_ratio: float, abs_min: float, top_k: int = 8, max_massive: int = 256,
                 n_candidates: int = 4) -> None:
        self.median_ratio, self.abs_min = float(median_ratio), float(abs_min)
        self.top_k, self.max_massive, self.n_candidates = top_k, max_massive, n_candidates

    def start(self, mask: torch.Tensor) -> None:
        """Before each batch: its (rows, width) attention mask (left padding)."""
        self.mask = mask.bool()
        self.padded = not bool(self.mask.all())
        self.lengths = self.mask.sum(1).tolist()
        self.offsets = [mask.shape[1] - n for n in self.lengths]
        self.per_row: list[list[dict[str, Any]]] = [[] for _ in range(mask.shape[0])]
        self.watch: list[dict[tuple[int, int], None]] = [{} for _ in range(mask.shape[0])]

    def hook(self, layer: int):
        def fn(module, args, output):
            self.reduce(layer, layer_output(output).detach())

        return fn

    def reduce(self, layer: int, h: torch.Tensor) -> None:
        B, T, H = h.shape
        a = h.float().abs()
        if self.padded:
            if self.mask.device != h.device:  # a split model: this layer sits on another device than the inputs
                self.mask = self.mask.to(h.device)
            a.masked_fill_(~self.mask[..., None], -1.0)  # pads never win a top-k or pass a cutoff (a is a fresh copy)
        per_pos = a.amax(-1)  # (B, T); NaN propagates, so this also catches inf/nan anywhere real
        if not bool(torch.isfinite(per_pos).all()):
            raise NumericOverflow(
                f"layer {layer} produced inf/nan in {str(h.dtype).replace('torch.', '')}: massive activations "
                "exceed this dtype's range; rerun with --dtype float32 (or bfloat16)"
            )
        medians = [lower_median(a[b, off:].reshape(-1)) for b, off in enumerate(self.offsets)]
        cut = (torch.tensor(medians, dtype=torch.float32) * self.median_ratio).clamp(min=self.abs_min)
        # the tokens that can hold a top entry: the top_k tokens by their maximum |a|
        n_tok = min(self.top_k, T)
        tok_v, tok_i = per_pos.topk(max(n_tok, min(self.n_candidates, T)), dim=1)
        sub = a.gather(1, tok_i[:, :n_tok, None].expand(-1, -1, H)).reshape(B, n_tok * H)
        top_v, top_j = sub.topk(min(self.top_k, n_tok * H), dim=1)
        top_pos = tok_i.gather(1, torch.div(top_j, H, rounding_mode="floor"))
        top_dim = top_j % H
        top_s = h[torch.arange(B, device=h.device)[:, None], top_pos, top_dim]
        # candidate tokens (largest maximum |a|) plus each row's first real token
        n_c = min(self.n_candidates, T)
        offs = torch.tensor(self.offsets, device=h.device)
        cands = torch.cat([tok_i[:, :n_c], offs[:, None]], dim=1)
        rows = a.gather(1, cands[..., None].expand(-1, -1, H)).cpu().numpy()
        hot = (per_pos > cut.to(per_pos.device)[:, None]) if bool((tok_v[:, 0].cpu() > cut).any()) else None
        top_l = (top_s.float().tolist(), top_pos.tolist(), top_dim.tolist(), top_v.tolist())
        cands_l = cands.tolist()
        massive_rows = self._massive(h, a, hot, cut) if hot is not None else [[] for _ in range(B)]
        watched_rows = self._watched(h)
        for b in range(B):
            off, n = self.offsets[b], self.lengths[b]
            keep = min(self.top_k, n * H)
            top = [(v, p - off, d) for v, p, d in zip(top_l[0][b][:keep], top_l[1][b][:keep], top_l[2][b][:keep])]
            massive = massive_rows[b]
            watch, watched = self.watch[b], watched_rows[b]
            for _, p, d in massive:
                if len(watch) < self.max_massive:
                    watch.setdefault((p, d))
            picks = [*range(min(n_c, n)), n_c]  # the row's real candidates, then its first real token
            row_map = {cands_l[b][j] - off: rows[b, j] for j in picks}
            self.per_row[b].append({"median": medians[b], "top": top, "massive": massive, "rows": row_map,
                                    "watched": watched})

    def _watched(self, h: torch.Tensor) -> list[dict[tuple[int, int], float]]:
        """Per row, the values at this layer of the (position, dim) entries found massive at earlier layers (one
        indexing of the whole batch)."""
        index = [(b, p + self.offsets[b], d) for b, watch in enumerate(self.watch) for p, d in watch]
        out: list[dict[tuple[int, int], float]] = [{} for _ in self.watch]
        if not index:
            return out
        b_i, p_i, d_i = torch.tensor(index, device=h.device).unbind(1)
        values = iter(h[b_i, p_i, d_i].float().tolist())
        for b, watch in enumerate(self.watch):
            out[b] = {key: next(values) for key in watch}
        return out

    def _massive(self, h: torch.Tensor, a: torch.Tensor, hot: torch.Tensor,
                 cut: torch.Tensor) -> list[list[tuple[float, int, int]]]:
        """Per row, its entries above its cutoff, largest first (at most ``max_massive``; equal values in
        (position, dim) order), found for the whole batch at once among the ``hot`` tokens."""
        out: list[list[tuple[float, int, int]]] = [[] for _ in range(a.shape[0])]
        b_i, t_i = hot.nonzero(as_tuple=True)
        if b_i.numel() == 0:
            return out
        vals = a[b_i, t_i]  # (hot tokens, dims)
        n_i, d_i = (vals > cut.to(vals.device)[b_i][:, None]).nonzero(as_tuple=True)
        if n_i.numel() == 0:
            return out
        v, rows, pos = vals[n_i, d_i], b_i[n_i], t_i[n_i]
        order = torch.argsort(v, descending=True, stable=True)
        order = order[torch.argsort(rows[order], stable=True)]  # by row, largest first within a row
        rows, pos, dims = rows[order], pos[order], d_i[order]
        signed = h[rows, pos, dims].float().tolist()
        for r, s, p, d in zip(rows.tolist(), signed, pos.tolist(), dims.tolist()):
            if len(out[r]) < self.max_massive:
                out[r].append((s, p - self.offsets[r], d))
        return out
