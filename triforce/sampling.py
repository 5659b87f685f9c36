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


def draw_uniform(shape: tuple, device, generator: torch.Generator | None = None) -> torch.Tensor:
    """The uniforms `sample` turns into a draw; drawn outside a CUDA graph, read inside it."""
    return torch.rand(shape, generator=generator, device=device)


def sample(probs: torch.Tensor, generator: torch.Generator | None = None,
           uniform: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row of probs [N, V], as the exponential race argmax(p / E), E ~ Exp(1).

    That is exactly a draw from each row (torch.multinomial does the same for one sample), but it
    needs no host sync and, given `uniform` [N, V] drawn outside, captures in a CUDA graph.
    E = -log(u) is capped so that u = 0 (probability 2^-24) cannot zero a token's score.
    """
    if uniform is None:
        uniform = draw_uniform(probs.shape, probs.device, generator)
    return (probs / uniform.log().neg().clamp_max(30.0)).argmax(-1)


def speculative_verify(draft: torch.Tensor, q: torch.Tensor, p: torch.Tensor,
                       generator: torch.Generator | None = None) -> tuple[int, torch.Tensor]:
    """Exact speculative sampling (Leviathan et al., Chen et al. 2023).

    draft [g] tokens drawn from q [g, V]; p [g+1, V] the verifier's distributions at the same
    positions plus one. Token i is accepted with probability min(1, p_i(x)/q_i(x)); at the first
    rejection the replacement is drawn from norm(max(0, p_i - q_i)); if all g pass, a bonus token is
    drawn from p_g. Returns (number accepted, next token). One host sync: reading the count, after
    every kernel of the round is queued.
    """
    g = draft.shape[0]
    if g == 0:
        return 0, sample(p[:1], generator)[0]
    px = p[:g].gather(1, draft[:, None])[:, 0]
    qx = q.gather(1, draft[:, None])[:, 0]
    u = torch.rand(g, generator=generator, device=draft.device)
    n_t = (u * qx < px).cumprod(0).sum()  # u < p/q without dividing; q(x) > 0 as x was drawn from q
    # the next token's distribution, picked on the device for whichever n it is: the residual
    # norm(max(0, p_n - q_n)) after a rejection, p_g (q_g taken as 0) when all g passed
    p_n = p.index_select(0, n_t.view(1))
    q_n = q.index_select(0, n_t.clamp(max=g - 1).view(1)) * (n_t < g)
    residual = (p_n - q_n).clamp_min(0)
    total = residual.sum()
    # p == q exactly leaves no residual mass; rejection then has probability 0 (guard only)
    dist = torch.where(total > 0, residual / total, p_n)
    nxt = sample(dist, generator)[0]
    return int(n_t), nxt
