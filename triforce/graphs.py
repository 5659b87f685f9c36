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
from triforce.sampling import process_logits, sample


class GraphedModel:
    """`model(tokens, cache, last)` through one CUDA graph per (T, last), captured on first use.

    `distributions` also captures what a tier does with the logits (temperature, top-p and, for
    the drafting tier, the draw of the next token), so a draft step costs the host a handful of
    launches instead of a few dozen.
    """

    def __init__(self, model: Transformer, cache: KVCache, sizes: set[int], warmup: int = 2, capture: bool = True):
        """`capture=False` runs the graph-mode code eagerly (device-side lengths, static shapes):
        how the CPU tests check the captured path's semantics."""
        self.model, self.cache, self.sizes, self.warmup, self.capture = model, cache, sizes, warmup, capture
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, tuple]] = {}
        self.pool = None
        self.uniform = torch.zeros(1, model.args.vocab_size, device=model.device)  # noise of in-graph draws

    def usable(self, n_new: int, last: int) -> bool:
        return n_new in self.sizes and self.cache.can_replay(n_new)

    def _capture(self, n_new: int, last: int, head):
        tokens = torch.zeros(1, n_new, dtype=torch.long, device=self.model.device)
        cache = self.cache
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        cache.graph_mode = True
        try:
            with torch.cuda.stream(side):  # warm-up writes only speculative positions, rewritten later
                for _ in range(self.warmup):
                    head(self.model(tokens, cache, last=last))
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = head(self.model(tokens, cache, last=last))
        finally:
            cache.graph_mode = False
        self.pool = graph.pool()
        return graph, tokens, out

    def _run(self, tokens: torch.Tensor, last: int, head, head_key: tuple) -> tuple:
        n_new = tokens.shape[1]
        self.cache.prepare(n_new)
        if not self.capture:
            self.cache.graph_mode = True
            try:
                out = head(self.model(tokens, self.cache, last=last))
            finally:
                self.cache.graph_mode = False
            self.cache.advance(n_new)
            return out
        key = (n_new, last, head_key, self.cache.graph_key())
        if key not in self.graphs:
            self.graphs[key] = self._capture(n_new, last, head)
            self.cache.prepare(n_new)
        graph, static_tokens, out = self.graphs[key]
        static_tokens.copy_(tokens)
        graph.replay()
        self.cache.advance(n_new)
        return out

    def __call__(self, tokens: torch.Tensor, last: int) -> torch.Tensor:
        """Logits [1, last, V] (float32), as `model(tokens, cache, last=last)`."""
        return self._run(tokens, last, lambda logits: (logits,), ())[0]

    def distributions(self, tokens: torch.Tensor, last: int, temperature: float, top_p: float,
                      generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Processed distributions [last, V] (a copy) and, with a generator, a token drawn from the
        last row (the graph's own buffer: copy it before the next replay).

        The uniforms of the draw come from `generator` outside the graph (one launch), exactly as
        the eager path draws them, so graphed and eager steps sample the same tokens.
        """
        draw = generator is not None
        if draw:
            torch.rand(self.uniform.shape, generator=generator, out=self.uniform)

        def head(logits):
            p = process_logits(logits[0], temperature, top_p)
            return p, (sample(p[-1:], uniform=self.uniform)[0] if draw else None)
        p, token = self._run(tokens, last, head, (temperature, top_p, draw))
        return p.clone(), token  # p outlives the next replay (a verifier compares against it)


def graph_sizes(tiers: list, level: int) -> set[int]:
    """Step sizes worth a graph for tier `level` of an engine's `tiers`.

    A verifier feeds its gamma drafts after the token the round before appended (gamma + 1), or
    one more when that round's last token came from above and it never saw it (gamma + 2). The
    drafting tier decodes one token, or catches up on the corrections of the rounds above (2-3).
    Anything else (prefill chunks, rarer catch-ups) runs eagerly.
    """
    if level == len(tiers) - 1:
        return {1, 2, 3}
    return {tiers[level].gamma + 1, tiers[level].gamma + 2}
