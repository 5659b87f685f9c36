"""(b) Decode/verify attention over selected chunks of the full KV, read in place (no gather copy).

The retrieval draft attends to `n_sel` chunks per KV head of the target's store plus a contiguous
tail (tokens after the selection boundary, ending with the T new ones). The reference gathers the
chunks and runs SDPA, as `SelectionCache.attend` does; the kernel reads the store where it lies.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import use_triton
from ._split_k import split_k_attention


def bottom_right_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [H, T, D] over k/v [KVH, N, D], the T queries being the last T keys (= triforce.cache.attention)."""
    t, n = q.shape[1], k.shape[1]
    mask = None
    if t > 1:
        mask = torch.arange(n, device=q.device)[None, :] <= torch.arange(n - t, n, device=q.device)[:, None]
    return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask,
                                          enable_gqa=q.shape[0] != k.shape[0])[0]


def chunk_positions(chunk_idx: torch.Tensor, chunk: int) -> torch.Tensor:
    """Token positions [KVH, n_sel * chunk] of chunk indices [KVH, n_sel]."""
    return (chunk_idx[..., None] * chunk + torch.arange(chunk, device=chunk_idx.device)).flatten(1)


def sparse_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk_idx: torch.Tensor,
                               chunk: int, tail_start: int, tail_end: int) -> torch.Tensor:
    """Gather the selected chunks, append the tail [tail_start, tail_end), bottom-right causal SDPA."""
    pos = chunk_positions(chunk_idx, chunk)[..., None].expand(-1, -1, k.shape[-1])
    keys = torch.cat((torch.gather(k, 1, pos), k[:, tail_start:tail_end]), dim=1)
    vals = torch.cat((torch.gather(v, 1, pos), v[:, tail_start:tail_end]), dim=1)
    return bottom_right_sdpa(q, keys, vals)


def sparse_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk_idx: torch.Tensor,
                            chunk: int, tail_start: int, tail_end: int, num_splits: int | None = None,
                            block_n: int = 64, out: torch.Tensor | None = None) -> torch.Tensor:
    """Split-K kernel: keys = chunks chunk_idx[h] (positions idx*chunk .. idx*chunk+chunk-1) then the tail."""
    if not 0 <= tail_start <= tail_end <= k.shape[1]:
        raise ValueError(f"tail [{tail_start}, {tail_end}) is outside the store of {k.shape[1]} tokens")
    if chunk_idx.shape[0] != k.shape[0]:
        raise ValueError(f"chunk_idx has {chunk_idx.shape[0]} rows for {k.shape[0]} KV heads")
    n_keys = chunk_idx.shape[1] * chunk + tail_end - tail_start
    return split_k_attention(q, k, v, n_keys, tail_start, chunk_idx, chunk, num_splits, block_n, out)


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk_idx: torch.Tensor,
                     chunk: int, tail_start: int, tail_end: int) -> torch.Tensor:
    """q [H, T, D] (rotated) -> [H, T, D]; k/v [KVH, S_max, D] the layer's store; chunk_idx [KVH, n_sel].

    Triton on CUDA (or under TRITON_INTERPRET=1), the gather + SDPA reference elsewhere.
    """
    if use_triton(q, k, v, chunk_idx):
        return sparse_attention_triton(q, k, v, chunk_idx, chunk, tail_start, tail_end)
    return sparse_attention_reference(q, k, v, chunk_idx, chunk, tail_start, tail_end)
