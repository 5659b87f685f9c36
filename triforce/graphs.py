"""CUDA-graph capture of decode and verify steps.

At small batch a decode step is a few hundred small kernels; launching them from Python costs
more than the bytes they read for a 4K-token draft cache. A graph replays them with one launch.
Shapes are static per (tier, tokens per step, rows kept); the caches read their lengths from
device scalars refreshed by `cache.prepare` before each replay, so no host sync is needed.
Prefill chunks, odd step sizes and re-selection steps run eagerly.

Under tensor parallelism the graphs contain the model's NCCL all-reduces: a blocking
`dist.all_reduce` is issued on the current (capturing) stream in recent PyTorch (pytorch#150398;
older versions join NCCL's own stream by events, which capture too), and the eager prefill has
created the communicator before the first capture. The engine's decision broadcasts stay outside.
"""
from __future__ import annotations

import torch

from triforce.cache import KVCache
from triforce.models.llama import Transformer


class GraphedModel:
    """`model(tokens, cache, last)` through one CUDA graph per (T, last), captured on first use."""

    def __init__(self, model: Transformer, cache: KVCache, sizes: set[int], warmup: int = 2, capture: bool = True):
        """`capture=False` runs the graph-mode code eagerly (device-side lengths, static shapes):
        how the CPU tests check the captured path's semantics."""
        self.model, self.cache, self.sizes, self.warmup, self.capture = model, cache, sizes, warmup, capture
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self.pool = None

    def usable(self, n_new: int, last: int) -> bool:
        return n_new in self.sizes and self.cache.can_replay(n_new)

    def _capture(self, n_new: int, last: int):
        tokens = torch.zeros(1, n_new, dtype=torch.long, device=self.model.device)
        cache = self.cache
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        cache.graph_mode = True
        try:
            with torch.cuda.stream(side):  # warm-up writes only speculative positions, rewritten later
                for _ in range(self.warmup):
                    self.model(tokens, cache, last=last)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                logits = self.model(tokens, cache, last=last)
        finally:
            cache.graph_mode = False
        self.pool = graph.pool()
        return graph, tokens, logits

    def __call__(self, tokens: torch.Tensor, last: int) -> torch.Tensor:
        n_new = tokens.shape[1]
        self.cache.prepare(n_new)
        if not self.capture:
            self.cache.graph_mode = True
            try:
                logits = self.model(tokens, self.cache, last=last)
            finally:
                self.cache.graph_mode = False
            self.cache.advance(n_new)
            return logits
        key = (n_new, last, self.cache.graph_key())
        if key not in self.graphs:
            self.graphs[key] = self._capture(n_new, last)
            self.cache.prepare(n_new)
        graph, static_tokens, logits = self.graphs[key]
        static_tokens.copy_(tokens)
        graph.replay()
        self.cache.advance(n_new)
        return logits
