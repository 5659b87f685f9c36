"""H2O, Heavy-Hitter Oracle (Zhang et al., 2023): keep the tokens with the largest *accumulated*
attention (heavy hitters) plus a recent window; `recent_ratio` of the budget is the window.

Why: a small set of tokens collects most attention mass across decoding steps, and the running
sum of attention each token received is a good greedy proxy for which ones will matter next.

How (honest and cheap): the draft cache never sees past queries, only the queries of the forward
in which it selects. At each selection the last <= `max_queries` queries' exact attention over
the prefix (`prefix_attention`: one attention-score pass per layer, as costly as one
full-attention decode step per query) is added to a per-(layer, KV head, position) float32
buffer, so with reselect="round"/N the sum accumulates over the whole generation, as in H2O;
with "once" it is the attention of the first drafting step. Buffer: L*KVH*max_length floats.
"""
from __future__ import annotations

import torch

from triforce.cache import FullCache, SelectionCache
from triforce.models.llama import Transformer
from triforce.policies.base import prefix_attention, recent_plus_top, split_budget


class H2OPolicy(SelectionCache):
    def __init__(self, full: FullCache, model: Transformer, budget: int, chunk_size: int = 8,
                 reselect: str | int = "once", recent_ratio: float = 0.5, max_queries: int = 8):
        if max_queries < 1:
            raise ValueError(f"max_queries must be >= 1, got {max_queries}")
        self.acc = torch.zeros(model.args.n_layers, model.n_kv_heads, full.max_length, device=model.device)
        super().__init__(full, model, budget, chunk_size, reselect)
        split_budget(self.budget, recent_ratio)  # validates
        self.recent_ratio = recent_ratio
        self.max_queries = max_queries

    def reset(self) -> None:
        super().reset()
        self.acc.zero_()

    def choose(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        b = self.boundary
        self.acc[layer, :, :b] += prefix_attention(self, layer, q, self.max_queries).sum(1)
        return recent_plus_top(self.acc[layer, :, :b], self.budget, split_budget(self.budget, self.recent_ratio))
