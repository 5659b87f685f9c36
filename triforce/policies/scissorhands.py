"""Scissorhands (Liu et al., 2023, "Exploiting the Persistence of Importance Hypothesis for LLM
KV Cache Compression at Test Time").

Why: tokens that were pivotal (highly attended) at earlier steps tend to stay pivotal (the
persistence of importance), so under a fixed budget one evicts the tokens that were *least often*
important over a history window of recent queries, always keeping a recent window.

How: at each selection, each of the last <= `max_queries` queries' exact attention over the prefix
(`prefix_attention`, one attention-score pass per layer) marks its top-`budget` tokens as
important; the index sets of the last `history` queries are kept per layer (small: history*KVH*
budget ints). A token's score is how many of them it appears in (ties broken by the current
attention); the best `budget - recent` plus the `recent_ratio` window are kept. With
reselect="round"/N the history spans rounds, as in the paper; with "once" it is the first step.
`kv_bits=4` simulates the paper's 4-bit compatibility: the gathered K/V copies are
quantize-dequantized per token (the target's store stays exact, so decoding stays lossless).
"""
from __future__ import annotations

from collections import deque

import torch

from triforce.cache import FullCache
from triforce.models.llama import Transformer
from triforce.policies.base import HookedSelection, check_kv_bits, prefix_attention, recent_plus_top, split_budget


class ScissorhandsPolicy(HookedSelection):
    def __init__(self, full: FullCache, model: Transformer, budget: int, chunk_size: int = 8,
                 reselect: str | int = "once", recent_ratio: float = 0.25, history: int = 16,
                 max_queries: int = 8, kv_bits: int = 0):
        if history < 1 or max_queries < 1:
            raise ValueError(f"history and max_queries must be >= 1, got {history}, {max_queries}")
        self.history, self.max_queries = history, max_queries
        super().__init__(full, model, budget, chunk_size, reselect)
        split_budget(self.budget, recent_ratio)  # validates
        self.recent_ratio = recent_ratio
        self.kv_bits = check_kv_bits(kv_bits)

    def reset(self) -> None:
        super().reset()
        self.important = [deque(maxlen=self.history) for _ in range(self.n_layers)]

    def choose(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        b = self.boundary
        probs = prefix_attention(self, layer, q, self.max_queries)  # [KVH, m, b]
        for row in probs.unbind(1):
            self.important[layer].append(row.topk(self.budget, dim=-1).indices)
        counts = torch.zeros(self.n_kv_heads, b, device=self.device)
        for idx in self.important[layer]:
            idx = idx.clamp_max(b - 1)  # (boundaries only grow within a generation; guard only)
            counts.scatter_add_(1, idx, torch.ones_like(idx, dtype=counts.dtype))
        mass = probs.sum(1)
        counts += 0.5 * mass / mass.amax(-1, keepdim=True).clamp_min(1e-12)  # tie-break in [0, 0.5]
        return recent_plus_top(counts, self.budget, split_budget(self.budget, self.recent_ratio))
