"""(d) Prefill attention: a chunk of T queries over the cached prefix and itself, bottom-right causal.

Chunked prefill (`prefill_chunk`) attends each chunk to every key before it plus itself: query i
of the chunk sees keys 0 .. S-T+i. SDPA with `causal_lower_right` (the reference's mask as a
bias) already runs PyTorch's flash kernel for this on CUDA in half precision (its dispatch calls
the flash op with causal=True, which is bottom-right for T < S), at ~345 TFLOP/s on an H200 for
the 7B shape. cuDNN's attention is faster there (~595 TFLOP/s square causal, head_dim 128) but
only knows top-left causal masks, so `cudnn_chunk_attention` splits the chunk's keys into the prefix
(no mask) and the chunk itself (square causal, where top-left is bottom-right) and merges the
two by their log-sum-exps. With the flash-attn package installed, its `flash_attn_func` (causal is
bottom-right there too) is used instead. Everything else (float32, CPU) takes the reference.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

HALF = (torch.float16, torch.bfloat16)


def prefill_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [1, H, T, D] over k/v [KVH, S, D], the T queries being the last T keys; SDPA, GQA by SDPA.

    On CUDA the mask is SDPA's `causal_lower_right` bias (flash where it applies; an explicit
    mask costs ~3.7x at 123K), elsewhere an explicit boolean mask.
    """
    t, s = q.shape[2], k.shape[1]
    mask = None
    if t > 1:
        if q.is_cuda:
            from torch.nn.attention.bias import causal_lower_right

            mask = causal_lower_right(t, s)
        else:
            mask = torch.arange(s, device=q.device)[None, :] <= torch.arange(s - t, s, device=q.device)[:, None]
    return F.scaled_dot_product_attention(q, k[None], v[None], attn_mask=mask, enable_gqa=q.shape[1] != k.shape[0])


@functools.lru_cache(maxsize=None)
def flash_attn_func():
    """flash-attn's `flash_attn_func` when that optional package imports, else None (looked up once)."""
    try:
        from flash_attn import flash_attn_func as fn
    except ImportError:
        return None
    return fn


def attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """cuDNN attention of q [1, H, T, D] over k/v [1, H, n, D] (top-left causal or no mask):
    (out [1, H, T, D] in q's dtype, natural-log log-sum-exp [1, H, T] float32)."""
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False)[:2]
    return out, lse.reshape(q.shape[:3]).float()


def merge_lse(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Softmax over the union of two key sets from each one's output [.., T, D] and log-sum-exp [.., T]."""
    (o1, l1), (o2, l2) = a, b
    lse = torch.logaddexp(l1, l2)
    return o1.float() * (l1 - lse).exp()[..., None] + o2.float() * (l2 - lse).exp()[..., None]


def can_use_cudnn(q: torch.Tensor, k: torch.Tensor) -> bool:
    """cuDNN attention applies: CUDA, half precision, as many KV heads as query heads (a GQA model's
    K/V would need repeating first), and PyTorch's own check of the shapes."""
    if not (q.is_cuda and q.dtype in HALF and q.shape[1] == k.shape[0] and torch.backends.cudnn.is_available()):
        return False
    from torch.backends.cuda import SDPAParams, can_use_cudnn_attention

    return can_use_cudnn_attention(SDPAParams(q, k[None], k[None], None, 0.0, False, False), False)


def cudnn_chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`prefill_attention_reference` as two cuDNN calls: the chunk over itself (square causal) and,
    when there is one, over the prefix (no mask), merged by log-sum-exp."""
    t, s = q.shape[2], k.shape[1]
    k, v = k[None], v[None]
    own = attention_lse(q, k[:, :, s - t:], v[:, :, s - t:], causal=True)
    if s == t:
        return own[0]
    prefix = attention_lse(q, k[:, :, :s - t], v[:, :, :s - t], causal=False)
    return merge_lse(prefix, own).to(q.dtype)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [1, H, T, D] (rotated) over k/v [KVH, S, D] -> [1, H, T, D]: flash-attn if installed (half
    precision), else cuDNN split in two where it applies, else the SDPA reference."""
    if q.dtype in HALF and flash_attn_func() is not None:
        out = flash_attn_func()(q.transpose(1, 2), k.transpose(0, 1)[None], v.transpose(0, 1)[None], causal=True)
        return out.transpose(1, 2)
    if can_use_cudnn(q, k):
        return cudnn_chunk_attention(q, k, v)
    return prefill_attention_reference(q, k, v)
