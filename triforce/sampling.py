"""Sampling and exact speculative verification.

Every tier turns logits into *processed* distributions (temperature, top-p) with the same
function, and verification compares those: that is what makes the output distribution exactly
the target's processed distribution. Temperature 0 gives one-hot distributions, for which the
same rule is greedy verification (accept the longest matching prefix, then the target's argmax).
"""
from __future__ import annotations

import torch

from triforce.kernels.row_uniform import row_uniform, seed_key


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


class RowStreams:
    """One random stream per row of a batch, seeded per row, all drawn by one launch.

    A row's draws depend only on its seed and on how many uniforms it drew before, never on the
    other rows of its batch, so a batch row draws exactly what a single run of it draws. The state
    (a key and a counter per row) lives on the device: drawing needs no host round-trip and no
    launch per row (`triforce.kernels.row_uniform`).
    """

    def __init__(self, seeds: list[int], device):
        self.keys = torch.tensor([seed_key(s) for s in seeds], dtype=torch.int64, device=device)
        self.counters = torch.zeros(len(seeds), dtype=torch.int64, device=device)
        self._masks: dict[tuple, torch.Tensor] = {}

    def reseed(self, row: int, seed: int) -> None:
        """Start row `row`'s stream afresh from `seed` (a new sequence taking a finished row's place)."""
        self.keys[row] = torch.tensor(seed_key(seed), dtype=torch.int64)
        self.counters[row] = 0

    def uniform(self, n: int, live: list[bool] | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Uniforms [B, n]; the streams of rows not `live` do not move (their draws are thrown away)."""
        out = row_uniform(self.keys, self.counters, n, out)
        if live is None or all(live):
            self.counters += n
        elif any(live):
            key = tuple(live)
            if key not in self._masks:  # the live set changes a few times per batch: one small tensor each
                self._masks[key] = torch.tensor(live, dtype=torch.int64, device=self.counters.device)
            self.counters.add_(self._masks[key], alpha=n)
        return out


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
                       streams: RowStreams) -> tuple[int, torch.Tensor]:
    """Exact speculative sampling (Leviathan et al., Chen et al. 2023) of one sequence.

    draft [g] tokens drawn from q [g, V]; p [g+1, V] the verifier's distributions at the same
    positions plus one. Token i is accepted with probability min(1, p_i(x)/q_i(x)); at the first
    rejection the replacement is drawn from norm(max(0, p_i - q_i)); if all g pass, a bonus token is
    drawn from p_g. Returns (number accepted, next token): `speculative_verify_rows` of a batch of one.
    """
    n, nxt = speculative_verify_rows(draft[None], q[None], p[None], streams)
    return int(n[0]), nxt[0]


def speculative_verify_rows(draft: torch.Tensor, q: torch.Tensor, p: torch.Tensor,
                            streams: RowStreams, live: list[bool] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`speculative_verify` of B sequences at once: draft [B, g], q [B, g, V], p [B, g+1, V], the rows'
    random streams (those of rows not `live` stay where they are: their results are thrown away).
    Returns accepted counts [B] and next tokens [B], both on the device: nothing here waits for the
    GPU, the caller reads the counts once, after every kernel of the round is queued.
    Each row draws g uniforms for the accept tests, then V for its next token, from its own stream
    (the same draws as a single sequence's verification), in one draw of g + V.
    """
    b, g = draft.shape
    if g == 0:
        return torch.zeros(b, dtype=torch.long, device=p.device), sample(p[:, 0], uniform=streams.uniform(p.shape[-1], live))
    px = p[:, :g].gather(2, draft[..., None])[..., 0]
    qx = q.gather(2, draft[..., None])[..., 0]
    u = streams.uniform(g + p.shape[-1], live)
    n_t = (u[:, :g] * qx < px).cumprod(1).sum(1)  # u < p/q without dividing; q(x) > 0 as x was drawn from q
    # the next token's distribution, picked on the device for whichever n it is: the residual
    # norm(max(0, p_n - q_n)) after a rejection, p_g (q_g taken as 0) when all g passed
    rows = torch.arange(b, device=p.device)
    p_n = p[rows, n_t]
    q_n = q[rows, n_t.clamp(max=g - 1)] * (n_t < g)[:, None]
    residual = (p_n - q_n).clamp_min(0)
    total = residual.sum(-1, keepdim=True)
    # p == q exactly leaves no residual mass; rejection then has probability 0 (guard only)
    dist = torch.where(total > 0, residual / total, p_n)
    nxt = sample(dist, uniform=u[:, g:])
    return n_t, nxt
