"""StreamingLLM as a middle tier (Xiao et al., 2023, "Efficient Streaming Language Models with
Attention Sinks"; TriForce uses it as the *tiny* draft's cache, Sun et al., 2024).

Why: the first tokens soak up attention mass whatever their content (attention sinks) and the
most recent tokens carry the local context, so `sinks` first positions + the most recent window
of the prefix is a content-free, zero-cost selection. Here it reads the target's own KV with
original positions (no position shift: the target's RoPE handles long positions), which makes it
the baseline every content-aware policy must beat. Cost: none beyond the gather.
"""
from __future__ import annotations

import torch

from triforce.cache import FullCache, SelectionCache
from triforce.models.llama import Transformer


class StreamingLLMPolicy(SelectionCache):
    def __init__(self, full: FullCache, model: Transformer, budget: int, chunk_size: int = 8,
                 reselect: str | int = "once", sinks: int = 4):
        super().__init__(full, model, budget, chunk_size, reselect)
        if not 0 <= sinks < self.budget:
            raise ValueError(f"streaming policy needs 0 <= sinks < budget ({self.budget}), got {sinks}")
        self.sinks = sinks

    def choose(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        b, n_recent = self.boundary, self.budget - self.sinks
        pos = torch.cat((torch.arange(self.sinks, device=self.device),
                         torch.arange(b - n_recent, b, device=self.device)))
        return pos.expand(self.n_kv_heads, -1)
