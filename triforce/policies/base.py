"""Shared pieces of the selection policies: attention scores over the prefix, position helpers,
fake quantization, and `HookedSelection` (a `SelectionCache` with fake-quantized copies).

All policies see the rotated query `q` [1, H, T, D] of the forward in which they select, and
the target's rotated keys in `cache.full.k`. Policies that rank by *attention* (H2O, ALISA,
Scissorhands, own) get it from `prefix_attention`: an exact softmax of the last few queries over
every key they can see, i.e. one extra attention-score pass per layer at selection time (the
cost of one full-attention decode step per query used; with reselect="once" it is paid once).
"""
from __future__ import annotations

import math

import torch

from triforce.cache import SelectionCache


def prefix_attention(cache: SelectionCache, layer: int, q: torch.Tensor, max_queries: int = 8) -> torch.Tensor:
    """Attention probabilities [KVH, m, boundary] (float32) of the last m <= max_queries queries.

    Each query head's softmax runs over every key it sees causally (prefix and tail), so the
    probabilities are the ones full attention would use; the rows are then cut to the prefix and
    summed over the query heads of each GQA group.
    """
    t, d = q.shape[2], q.shape[3]
    m = min(t, max_queries)
    e = cache.length + t
    kvh = cache.n_kv_heads
    qs = q[0, :, t - m:].reshape(kvh, -1, m, d)  # [KVH, G, m, D]
    logits = torch.einsum("hgtd,hsd->hgts", qs, cache.full.k[layer, :, :e]).float() / math.sqrt(d)
    hidden = torch.arange(e, device=q.device)[None, :] > torch.arange(e - m, e, device=q.device)[:, None]
    logits.masked_fill_(hidden, float("-inf"))
    return logits.softmax(-1)[..., :cache.boundary].sum(1)


def recent_positions(boundary: int, n: int, n_heads: int, device) -> torch.Tensor:
    """The n positions just below `boundary`, [n_heads, n]."""
    return torch.arange(boundary - n, boundary, device=device).expand(n_heads, n)


def recent_plus_top(scores: torch.Tensor, budget: int, n_recent: int) -> torch.Tensor:
    """`n_recent` most recent positions + the best-scoring others; scores [KVH, boundary]."""
    kvh, boundary = scores.shape
    recent = recent_positions(boundary, n_recent, kvh, scores.device)
    top = scores[:, :boundary - n_recent].topk(budget - n_recent, dim=-1).indices
    return torch.cat((top, recent), dim=1).sort(dim=-1).values


def chunk_positions(chunks: torch.Tensor, chunk: int) -> torch.Tensor:
    """Chunk indices [KVH, n] -> their token positions [KVH, n * chunk] (ascending if chunks are)."""
    return (chunks[..., None] * chunk + torch.arange(chunk, device=chunks.device)).flatten(1)


def split_budget(budget: int, ratio: float, name: str = "recent_ratio") -> int:
    """Tokens of `budget` given to the recent window (at least 1, at most budget - 1)."""
    if not 0 <= ratio <= 1:
        raise ValueError(f"{name} must be in [0, 1], got {ratio}")
    return min(max(int(round(budget * ratio)), 1), budget - 1) if budget > 1 else 0


def fake_quant(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize-dequantize along the last dim (per token and head, asymmetric min/max, `bits` bits)."""
    xf = x.float()
    lo, hi = xf.amin(-1, keepdim=True), xf.amax(-1, keepdim=True)
    scale = (hi - lo).clamp_min(1e-8) / (2 ** bits - 1)
    return (((xf - lo) / scale).round() * scale + lo).to(x.dtype)


def check_kv_bits(bits: int) -> int:
    if bits not in (0, 2, 4, 8):
        raise ValueError(f"kv_bits must be 0 (off), 2, 4 or 8, got {bits}")
    return bits


class HookedSelection(SelectionCache):
    """`SelectionCache` whose gathered copies may be fake-quantized (`kv_bits` > 0, the target's
    store is never touched). Quantized copies are what such a policy attends to, so the GPU graph
    path, which reads the store in place, is off for it."""

    kv_bits = 0

    @property
    def graph_ready(self) -> bool:
        return not self.kv_bits

    def post_gather(self, layer: int) -> None:
        if self.kv_bits:
            self.sel_k[layer] = fake_quant(self.sel_k[layer], self.kv_bits)
            self.sel_v[layer] = fake_quant(self.sel_v[layer], self.kv_bits)
