"""Sampling and exact speculative verification.

Every tier turns logits into *processed* distributions (temperature, top-p) with the same
function, and verification compares those: that is what makes the output distribution exactly
the target's processed distribution. Temperature 0 gives one-hot distributions, for which the
same rule is greedy verification (accept the longest matching prefix, then the target's argmax).
"""
from __future__ import annotations

import torch


def check_sampling(temperature: float, top_p: float) -> None:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def process_logits(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Logits [N, V] -> probabilities [N, V] (float32) after temperature and nucleus filtering."""
    logits = logits.float()
    if temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of probs [N, V]."""
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def speculative_verify(draft: torch.Tensor, q: torch.Tensor, p: torch.Tensor,
                       generator: torch.Generator | None = None) -> tuple[int, torch.Tensor]:
    """Exact speculative sampling (Leviathan et al., Chen et al. 2023).

    draft [g] tokens drawn from q [g, V]; p [g+1, V] the verifier's distributions at the same
    positions plus one. Token i is accepted with probability min(1, p_i(x)/q_i(x)); at the first
    rejection the replacement is drawn from norm(max(0, p_i - q_i)); if all g pass, a bonus token is
    drawn from p_g. Returns (number accepted, next token). One host sync: reading the count.
    """
    g = draft.shape[0]
    rows = torch.arange(g, device=draft.device)
    px, qx = p[rows, draft], q[rows, draft]
    u = torch.rand(g, generator=generator, device=draft.device)
    accepted = u * qx < px  # u < p/q without dividing; q(x) > 0 as x was drawn from q
    n = int(accepted.cumprod(0).sum()) if g else 0
    if n < g:
        residual = (p[n] - q[n]).clamp_min(0)
        total = residual.sum()
        # p == q exactly leaves no residual mass; rejection then has probability 0 (guard only)
        dist = residual / total if total > 0 else p[n]
    else:
        dist = p[g]
    return n, sample(dist[None], generator)[0]
