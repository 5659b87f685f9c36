"""Own policy, "observed attention-mass chunks": sink chunk + recent chunks + the chunks that hold
the most exact attention mass of an observation window of real queries.

Reasoning (aimed at small budgets, where every chunk counts):
- Retrieval ranks a chunk by q.mean(k) of one query: a chunk with one strongly attended token
  among indifferent ones scores like an average chunk, GQA heads whose logits live on different
  scales are summed raw, and a single query is a noisy sample of what the next drafts will read.
- What the draft loses by dropping a chunk is exactly the attention mass it held, so rank by that:
  per query head, the exact softmax over every key it sees, summed over the chunk, the GQA group
  and the queries (`prefix_attention`).
- More queries: `adopt_prefix` leaves the last `observe` prompt tokens un-adopted, so the engine's
  first draft forward re-reads them (SnapKV's observation window, Li et al., 2024) and their real
  queries vote too (the last <= `max_queries` queries). Cost, paid once with reselect="once": a
  batched forward of `observe` extra tokens plus one attention-score pass per layer over the
  prefix for each query used (~ group_size * chunk * queries times retrieval's mean-key scoring).
- The next tokens attend recent text most reliably (locality), so `recent_ratio` of the budget
  is a window of the most recent prefix chunks; chunk 0 holds the attention sinks and is kept.
- Chunks rather than tokens: neighbours of an attended token tend to be attended next (phrases,
  copied spans), and contiguous gathers are cheap on GPUs.
Measured (SmolLM2-135M, 2000-token prompts of 5 corpus texts, teacher-forced greedy agreement of
the draft with the target over 128 tokens): 0.867 vs retrieval's 0.816 at budget 128, 0.892 vs
0.856 at budget 256; without the observation window 0.827 / 0.870.
"""
from __future__ import annotations

import torch

from triforce.cache import FullCache, SelectionCache
from triforce.models.llama import Transformer
from triforce.policies.base import chunk_positions, prefix_attention


class AttentionMassPolicy(SelectionCache):
    def __init__(self, full: FullCache, model: Transformer, budget: int, chunk_size: int = 8,
                 reselect: str | int = "once", recent_ratio: float = 0.25, max_queries: int = 32,
                 observe: int = 16):
        super().__init__(full, model, budget, chunk_size, reselect)
        if not 0 <= recent_ratio <= 1:
            raise ValueError(f"recent_ratio must be in [0, 1], got {recent_ratio}")
        if max_queries < 1 or observe < 0:
            raise ValueError(f"own policy needs max_queries >= 1 and observe >= 0, got {max_queries}, {observe}")
        self.recent_ratio, self.max_queries, self.observe = recent_ratio, max_queries, observe

    def adopt_prefix(self, length: int) -> bool:
        """Adopt all but the last `observe` prompt tokens: the first draft forward re-reads them."""
        super().adopt_prefix(length)
        self.length = max(0, length - self.observe)
        return True

    def choose(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        n_chunks, n_keep = self.boundary // self.chunk, self.budget // self.chunk
        mass = prefix_attention(self, layer, q, self.max_queries).sum(1)  # [KVH, boundary]
        scores = mass.unflatten(1, (n_chunks, self.chunk)).sum(-1)
        n_recent = min(int(round(n_keep * self.recent_ratio)), n_keep - 1)
        scores[:, 0] = float("inf")  # attention sink
        if n_recent:
            scores[:, n_chunks - n_recent:] = float("inf")
        top = scores.topk(n_keep, dim=-1).indices.sort(dim=-1).values
        return chunk_positions(top, self.chunk)
