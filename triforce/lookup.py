"""Prompt-lookup draft: the bottom tier as n-gram matching over the tokens so far (no weights).

Why: a 135M model on a big GPU is bound by kernel launches, not bytes, so a self-draft over a
small KV costs as much per token as the target's step and no model draft can pay off (README,
speed section). Long-context work (summaries, QA over a document, code edits) copies spans of
its context; a draft that proposes "what followed the last occurrence of the current suffix"
costs a dozen tiny kernels and no weights. Its distribution is one-hot, so exact verification
accepts a proposal with the verifier's probability of that token and resamples from the rest:
the pipeline stays lossless.

It plugs in as a model + cache pair, so the engine is unchanged: `PromptLookup(tokens, cache,
last)` records tokens in the `LookupCache` and returns one-hot logits (0 at the proposal, -inf
elsewhere) for the last row.
"""
from __future__ import annotations

import torch

from triforce.cache import KVCache


class LookupCache(KVCache):
    """The token history a `PromptLookup` matches against (on the device: no host sync per draft)."""

    def __init__(self, capacity: int, device: torch.device | str):
        self.tokens = torch.zeros(capacity, dtype=torch.long, device=device)
        self.capacity, self.device, self.length = capacity, torch.device(device), 0
        self.graph_mode = False

    def begin(self, n_new: int) -> None:
        if self.length + n_new > self.capacity:
            raise ValueError(f"{self.length + n_new} tokens exceed the lookup history's {self.capacity}")


class PromptLookup:
    """Proposes the token that followed the most recent earlier occurrence of the longest suffix
    (up to `max_ngram` tokens) of the sequence; with no earlier occurrence, the last token again."""

    def __init__(self, vocab_size: int, max_ngram: int = 3):
        if max_ngram < 1:
            raise ValueError(f"max_ngram must be >= 1, got {max_ngram}")
        self.vocab_size, self.max_ngram = vocab_size, max_ngram

    def eval(self) -> "PromptLookup":
        return self

    def propose(self, hist: torch.Tensor) -> torch.Tensor:
        """The proposal after hist [L] (a 0-d device tensor)."""
        n = hist.shape[0]
        if n < 2:
            return hist[-1]
        ends = hist[:-1]  # candidate match ends j: token j+1 followed them
        run = torch.ones(n - 1, dtype=torch.long, device=hist.device)
        score = torch.zeros_like(run)
        for k in range(min(self.max_ngram, n - 1)):  # suffix token L-1-k vs token j-k
            same = torch.zeros_like(run)
            same[k:] = (ends[:n - 1 - k] == hist[n - 1 - k]).long()
            run = run * same
            score = score + run
        best = (score * n + torch.arange(n - 1, device=hist.device)).argmax()  # longest, then most recent
        return torch.where(score[best] > 0, hist[best + 1], hist[-1])

    def __call__(self, tokens: torch.Tensor, cache: LookupCache, last: int | None = None) -> torch.Tensor:
        if len(cache.rows) > 1:  # a batch: each row matches against its own history
            return torch.cat([self(tokens[b:b + 1], c, last) for b, c in enumerate(cache.rows)])
        cache = cache.rows[0]
        t = tokens.shape[1]
        cache.begin(t)
        cache.tokens[cache.length:cache.length + t] = tokens[0]
        cache.length += t
        if not last:
            return torch.zeros(1, 0, self.vocab_size, device=tokens.device)
        if last != 1:
            raise ValueError(f"the lookup draft predicts one token per forward (last=1), got last={last}")
        logits = torch.full((1, 1, self.vocab_size), float("-inf"), device=tokens.device)
        logits[0, 0, self.propose(cache.tokens[:cache.length])] = 0.0
        return logits
