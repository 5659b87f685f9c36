"""(c) Flash-decoding for a few queries (T = 1..32) over a long contiguous KV, GQA, bottom-right causal.

The target's verify step: T new tokens (the last T keys) attend to the whole cache. Memory bound:
the floor is reading K and V once. SDPA with `causal_lower_right` may already reach it on the GPU;
this kernel is here to measure against it (scripts/bench_kernels.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import use_triton
from ._split_k import split_k_attention


def decode_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [H, T, D] over k/v [KVH, S, D]; SDPA with the lower-right causal bias (no materialised mask)."""
    bias = None
    if q.shape[1] > 1:
        from torch.nn.attention.bias import causal_lower_right
        bias = causal_lower_right(q.shape[1], k.shape[1])
    return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=bias,
                                          enable_gqa=q.shape[0] != k.shape[0])[0]


def decode_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_splits: int | None = None,
                            block_n: int = 64, out: torch.Tensor | None = None) -> torch.Tensor:
    """Split-K kernel over all S keys of k/v [KVH, S, D] (a view of the store, e.g. full.k[layer, :, :e])."""
    return split_k_attention(q, k, v, k.shape[1], 0, None, 1, num_splits, block_n, out)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [H, T, D] (rotated) -> [H, T, D]; Triton on CUDA (or interpreted), SDPA elsewhere."""
    if use_triton(q, k, v):
        return decode_attention_triton(q, k, v)
    return decode_attention_reference(q, k, v)
