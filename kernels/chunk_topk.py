"""(a) Retrieval-cache chunk selection: chunk mean summaries, GQA-summed scores, top-k chunks.

Matches `RetrievalCache.chunk_scores` / `choose`: a chunk's summary is the mean of its (rotated)
keys, a KV head scores it with the sum of its group's last-token queries, chunk 0 (the attention
sink) is always kept, and the selected indices come back sorted. Scoring is a GEMV over the C
chunks (one program per block of chunks and KV head). Top-k stays `torch.topk` + sort: one
radix-select launch on [KVH, C] (C <= ~16K) is cheap next to reading the summaries, so a Triton
top-k isn't worth its code.
"""
from __future__ import annotations

import torch

from ._common import HAS_TRITON, check_head_dim, next_pow2, tl, triton, use_triton

if HAS_TRITON:

    @triton.jit
    def _chunk_mean_kernel(K, OUT, n_chunks, sk_h, sk_s, so_h, so_c,
                           CHUNK: tl.constexpr, D: tl.constexpr, BLOCK_C: tl.constexpr):
        h, cb = tl.program_id(0), tl.program_id(1)
        c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        ok = c < n_chunks
        d = tl.arange(0, D)
        acc = tl.zeros([BLOCK_C, D], tl.float32)
        for j in tl.static_range(CHUNK):
            acc += tl.load(K + h * sk_h + (c * CHUNK + j)[:, None] * sk_s + d[None, :],
                           mask=ok[:, None], other=0.0).to(tl.float32)
        tl.store(OUT + h * so_h + c[:, None] * so_c + d[None, :], (acc / CHUNK).to(OUT.dtype.element_ty),
                 mask=ok[:, None])

    @triton.jit
    def _chunk_score_kernel(Q, S, OUT, n_chunks, G, sq_h, ss_h, ss_c, so_h,
                            D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr, SINK: tl.constexpr):
        h, cb = tl.program_id(0), tl.program_id(1)
        gi = tl.arange(0, BLOCK_G)
        d = tl.arange(0, D)
        q = tl.load(Q + (h * G + gi)[:, None] * sq_h + d[None, :], mask=(gi < G)[:, None], other=0.0)
        q = tl.sum(q.to(tl.float32), 0)  # the group's summed query
        c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        ok = c < n_chunks
        s = tl.load(S + h * ss_h + c[:, None] * ss_c + d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        score = tl.sum(s * q[None, :], 1)
        if SINK:
            score = tl.where(c == 0, float("inf"), score)
        tl.store(OUT + h * so_h + c, score, mask=ok)


def chunk_summaries_reference(keys: torch.Tensor, chunk: int) -> torch.Tensor:
    """keys [KVH, n*chunk, D] -> means [KVH, n, D] (fp32 accumulation, keys' dtype)."""
    kvh, s, d = keys.shape
    return keys.unflatten(1, (s // chunk, chunk)).float().mean(2).to(keys.dtype)


def chunk_summaries(keys: torch.Tensor, chunk: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Chunk means of keys [KVH, n*chunk, D] into out [KVH, n, D] (may be a view of the summary store)."""
    kvh, s, d = keys.shape
    if s % chunk:
        raise ValueError(f"{s} keys are not whole chunks of {chunk}")
    if not use_triton(keys):
        ref = chunk_summaries_reference(keys, chunk)
        return ref if out is None else out.copy_(ref)
    check_head_dim(d)
    n = s // chunk
    if out is None:
        out = torch.empty(kvh, n, d, dtype=keys.dtype, device=keys.device)
    if n:
        block_c = 32
        _chunk_mean_kernel[(kvh, triton.cdiv(n, block_c))](
            keys, out, n, keys.stride(0), keys.stride(1), out.stride(0), out.stride(1),
            CHUNK=chunk, D=d, BLOCK_C=block_c)
    return out


def chunk_scores_reference(q: torch.Tensor, summaries: torch.Tensor, sink: bool = False) -> torch.Tensor:
    """q [H, D], summaries [KVH, C, D] -> fp32 scores [KVH, C] (chunk 0 = +inf with `sink`)."""
    kvh = summaries.shape[0]
    query = q.float().view(kvh, q.shape[0] // kvh, -1).sum(1)
    scores = torch.einsum("hd,hcd->hc", query, summaries.float())
    if sink:
        scores[:, 0] = float("inf")
    return scores


def chunk_scores(q: torch.Tensor, summaries: torch.Tensor, sink: bool = False) -> torch.Tensor:
    """GQA-summed q·summary per KV head and chunk, fp32 [KVH, C]."""
    if not use_triton(q, summaries):
        return chunk_scores_reference(q, summaries, sink)
    h, d = q.shape
    kvh, c, _ = summaries.shape
    check_head_dim(d)
    if q.stride(-1) != 1 or summaries.stride(-1) != 1:
        raise ValueError("q and summaries need a contiguous head_dim axis")
    out = torch.empty(kvh, c, dtype=torch.float32, device=q.device)
    if c:
        block_c = 64
        _chunk_score_kernel[(kvh, triton.cdiv(c, block_c))](
            q, summaries, out, c, h // kvh, q.stride(0), summaries.stride(0), summaries.stride(1), out.stride(0),
            D=d, BLOCK_G=next_pow2(h // kvh), BLOCK_C=block_c, SINK=sink)
    return out


def select_chunks_reference(q: torch.Tensor, summaries: torch.Tensor, n_select: int) -> torch.Tensor:
    scores = chunk_scores_reference(q, summaries, sink=True)
    return scores.topk(n_select, dim=-1).indices.sort(dim=-1).values


def select_chunks(q: torch.Tensor, summaries: torch.Tensor, n_select: int) -> torch.Tensor:
    """Sorted indices [KVH, n_select] of the best chunks, chunk 0 always in; q [H, D] the last query."""
    if not 1 <= n_select <= summaries.shape[1]:
        raise ValueError(f"cannot select {n_select} of {summaries.shape[1]} chunks")
    scores = chunk_scores(q, summaries, sink=True)
    return scores.topk(n_select, dim=-1).indices.sort(dim=-1).values
