"""ALISA sparse window attention (Zhao et al., 2024, "ALISA: Accelerating Large Language Model
Inference via Sparsity-Aware KV Caching").

Why: attention mixes a locally static pattern (the recent tokens) with a globally dynamic one
(a few distant tokens that matter *now*). ALISA's Sparse Window Attention keeps a local window
plus the globally important tokens ranked by the attention the *recent* queries gave them (unlike
H2O's all-time sum, old attention ages out), and stores KV in INT8.

How: at each selection the exact attention rows of the last <= `max_queries` queries
(`prefix_attention`, one attention-score pass per layer) are pushed into a per-layer window of the
last `history` query rows ([KVH, prefix] floats each); a token's importance is the sum over that
window. `window_ratio` of the budget is the local window. `kv_bits=8` quantize-dequantizes the
gathered K/V copies (INT8 KV), never the target's store, so decoding stays lossless.
"""
from __future__ import annotations

from collections import deque

import torch

from triforce.cache import FullCache
from triforce.models.llama import Transformer
from triforce.policies.base import HookedSelection, check_kv_bits, prefix_attention, recent_plus_top, split_budget


class ALISAPolicy(HookedSelection):
    def __init__(self, full: FullCache, model: Transformer, budget: int, chunk_size: int = 8,
                 reselect: str | int = "once", window_ratio: float = 0.5, history: int = 8,
                 max_queries: int = 8, kv_bits: int = 0):
        if history < 1 or max_queries < 1:
            raise ValueError(f"history and max_queries must be >= 1, got {history}, {max_queries}")
        self.history, self.max_queries = history, max_queries
        super().__init__(full, model, budget, chunk_size, reselect)
        split_budget(self.budget, window_ratio, "window_ratio")  # validates
        self.window_ratio = window_ratio
        self.kv_bits = check_kv_bits(kv_bits)

    def reset(self) -> None:
        super().reset()
        self.history_rows = [deque(maxlen=self.history) for _ in range(self.n_layers)]

    def choose(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        b = self.boundary
        self.history_rows[layer].extend(prefix_attention(self, layer, q, self.max_queries).unbind(1))
        score = torch.zeros(self.n_kv_heads, b, device=self.device)
        for row in self.history_rows[layer]:
            n = min(b, row.shape[1])
            score[:, :n] += row[:, :n]
        return recent_plus_top(score, self.budget, split_budget(self.budget, self.window_ratio, "window_ratio"))
