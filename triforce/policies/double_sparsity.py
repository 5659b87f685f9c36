"""Double Sparsity (Yang et al., 2024, "Post-Training Sparse Attention with Double Sparsity").

Why: which *tokens* matter changes every step, but which *channels* of q.k dominate the logits is
nearly static per head. Offline calibration picks the r heaviest channels per (layer, KV head);
a "label cache" holding only those channels of every key then ranks all prefix tokens at r/D of
the cost of exact scores, and the top-k *tokens* (not chunks) are attended exactly.

How: `calibrate(token_ids)` (or `calibrate_channels`) runs the model once over calibration text
with a recording cache and ranks channels by mean|q_c| (summed over the GQA group) * mean|k_c| of
the rotated q/k, as stored. The label cache ([L, KVH, max_length, r]) is filled incrementally
from the target's verified keys (each key once). Selection: per query head softmax of the
approximate logits q[ch].k[ch]/sqrt(D) of the last <= `max_queries` queries, summed over the GQA
group. If `calibrate` was never called, the channels are calibrated *online* at the first
selection from the current query and the prefix keys (SparQ-style; one pass over the prefix keys).
"""
from __future__ import annotations

import math

import torch

from triforce.cache import FullCache, SelectionCache
from triforce.models.llama import Transformer, rope_qk


class _ChannelRecorder(FullCache):
    """A FullCache that sums |q| (per KV head, over the group) and |k| of each rotated channel."""

    def __init__(self, model: Transformer, max_length: int):
        super().__init__(model, max_length)
        shape = (self.n_layers, self.n_kv_heads, self.head_dim)
        self.q_abs = torch.zeros(shape, device=self.device)
        self.k_abs = torch.zeros(shape, device=self.device)

    def attend(self, layer, q, k, v):
        rq, rk = rope_qk(q, k, self.cos, self.sin)
        g = q.shape[1] // self.n_kv_heads
        self.q_abs[layer] += rq[0].float().abs().unflatten(0, (self.n_kv_heads, g)).sum((1, 2))
        self.k_abs[layer] += rk[0].float().abs().sum(1)
        return super().attend(layer, q, k, v)


@torch.inference_mode()
def calibrate_channels(model: Transformer, token_ids: torch.Tensor, channels: int) -> torch.Tensor:
    """Indices [L, KVH, channels] of the heaviest rotated q.k channels on calibration tokens (1-D)."""
    if not 1 <= channels <= model.args.head_dim:
        raise ValueError(f"channels must be in 1..{model.args.head_dim}, got {channels}")
    if token_ids.ndim != 1 or token_ids.numel() < 1:
        raise ValueError("calibration needs a non-empty 1-D tensor of token ids")
    rec = _ChannelRecorder(model, token_ids.numel())
    for start in range(0, token_ids.numel(), 512):
        model(token_ids[None, start:start + 512].to(model.device), rec, last=0)
    return (rec.q_abs * rec.k_abs).topk(channels, dim=-1).indices.sort(dim=-1).values


class DoubleSparsityPolicy(SelectionCache):
    def __init__(self, full: FullCache, model: Transformer, budget: int, chunk_size: int = 8,
                 reselect: str | int = "once", channels: int = 0, max_queries: int = 8):
        channels = channels or max(1, model.args.head_dim // 4)
        if not 1 <= channels <= model.args.head_dim:
            raise ValueError(f"channels must be in 1..{model.args.head_dim}, got {channels}")
        if max_queries < 1:
            raise ValueError(f"max_queries must be >= 1, got {max_queries}")
        self.model, self.n_channels, self.max_queries = model, channels, max_queries
        self.channels: torch.Tensor | None = None  # [L, KVH, r], from calibrate()
        self.labels = torch.zeros(model.args.n_layers, model.n_kv_heads, full.max_length, channels,
                                  dtype=model.dtype, device=model.device)
        super().__init__(full, model, budget, chunk_size, reselect)

    def calibrate(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Offline calibration on calibration text; the channels stay for later generations."""
        self.channels = calibrate_channels(self.model, token_ids, self.n_channels)
        self.n_labeled = [0] * self.n_layers
        return self.channels

    def reset(self) -> None:
        super().reset()
        self.n_labeled = [0] * self.n_layers
        self.online: list[torch.Tensor | None] = [None] * self.n_layers

    def _online_channels(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        g = q.shape[1] // self.n_kv_heads
        q_abs = q[0].float().abs().unflatten(0, (self.n_kv_heads, g)).sum((1, 2))  # [KVH, D]
        k_abs = self.full.k[layer, :, :self.boundary].float().abs().mean(1)
        return (q_abs * k_abs).topk(self.n_channels, dim=-1).indices.sort(dim=-1).values

    def choose(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        b = self.boundary
        if self.channels is not None:
            ch = self.channels[layer]  # [KVH, r]
        else:  # no offline calibration: calibrate online at this generation's first selection
            if self.online[layer] is None:
                self.online[layer] = self._online_channels(layer, q)
            ch = self.online[layer]
        done = self.n_labeled[layer]
        if done < b:  # label cache: the r channels of every verified key, written once
            keys = self.full.k[layer, :, done:b]
            self.labels[layer, :, done:b] = keys.gather(2, ch[:, None, :].expand(-1, b - done, -1))
            self.n_labeled[layer] = b
        t, d = q.shape[2], q.shape[3]
        m = min(t, self.max_queries)
        qs = q[0, :, t - m:].unflatten(0, (self.n_kv_heads, -1))  # [KVH, G, m, D]
        qs = qs.gather(3, ch[:, None, None, :].expand(-1, qs.shape[1], m, -1))
        logits = torch.einsum("hgtr,hsr->hgts", qs, self.labels[layer, :, :b]).float() / math.sqrt(d)
        score = logits.softmax(-1).sum((1, 2))
        return score.topk(self.budget, dim=-1).indices.sort(dim=-1).values
