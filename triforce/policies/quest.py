"""Quest (Tang et al., 2024, "Quest: Query-Aware Sparsity for Efficient Long-Context LLM
Inference"): query-aware chunk selection by per-channel key bounds.

Why: a chunk's mean key (TriForce's retrieval summary) averages away the one key that a query
hits hard. Quest keeps, per chunk and channel, the min and max of the keys; for a query q,
sum_c max(q_c * min_c, q_c * max_c) is an upper bound of q.k over the chunk's keys, so a chunk
holding one strongly matching token is never ranked low.

How: a `RetrievalCache` whose chunk summaries are the min (in `summaries`) and max (in `kmax`) of
each chunk's rotated keys, computed once per verified chunk (2x retrieval's summary memory,
D/chunk of the KV). Per query head of the GQA group, the bounds of the last query are turned into
a softmax over chunks (so heads with different logit scales weigh alike) and summed; chunk 0
(the attention sink) is always kept, as in retrieval.
"""
from __future__ import annotations

import math

import torch

from triforce.cache import FullCache, RetrievalCache
from triforce.models.llama import Transformer


class QuestPolicy(RetrievalCache):
    def __init__(self, full: FullCache, model: Transformer, budget: int, chunk_size: int = 8,
                 reselect: str | int = "once"):
        super().__init__(full, model, budget, chunk_size, reselect)
        shape = (model.args.n_layers, model.n_kv_heads, full.max_length // chunk_size, model.args.head_dim)
        self.summaries = torch.zeros(shape, dtype=model.dtype, device=model.device)  # per-channel min
        self.kmax = torch.zeros_like(self.summaries)

    def chunk_scores(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        n_chunks, c = self.boundary // self.chunk, self.chunk
        done = self.n_summarized[layer]
        if done < n_chunks:
            keys = self.full.k[layer, :, done * c:n_chunks * c].unflatten(1, (n_chunks - done, c))
            self.summaries[layer, :, done:n_chunks] = keys.amin(2)
            self.kmax[layer, :, done:n_chunks] = keys.amax(2)
            self.n_summarized[layer] = n_chunks
        query = q[0, :, -1].float().unflatten(0, (self.n_kv_heads, -1))[:, :, None, :]  # [KVH, G, 1, D]
        lo = self.summaries[layer, :, None, :n_chunks].float()  # [KVH, 1, C, D]
        hi = self.kmax[layer, :, None, :n_chunks].float()
        bound = torch.maximum(query * lo, query * hi).sum(-1) / math.sqrt(q.shape[-1])  # [KVH, G, C]
        return bound.softmax(-1).sum(1)
