"""RoPE of a step's queries and keys fused with the write of its keys and values into the KV store.

Under CUDA graphs a decode step costs about one launch per small kernel; per layer, rotating q
and k and the two `index_copy_` writes of k and v were three of them (~2.5 us each, 0.2 ms of a
7B retrieval-tier step). Here one program per (token, head) rotates a query head, or rotates a
key head and writes it with its value head to store rows `idx[t]`: one launch per layer. Math in
float32, rounded once, as the compiled `rope_qk` does.
"""
from __future__ import annotations

import torch

from triforce.models.llama import rope_qk

from ._common import tl, triton, use_triton

if triton is not None:

    @triton.jit
    def _rotate(src, dst, d, c_lo, c_hi, s_lo, s_hi, HALF: tl.constexpr):
        """dst <- src rotated (rotate-half layout), float32 math, one rounding."""
        lo = tl.load(src + d).to(tl.float32)
        hi = tl.load(src + HALF + d).to(tl.float32)
        tl.store(dst + d, (lo * c_lo - hi * s_lo).to(dst.dtype.element_ty))
        tl.store(dst + HALF + d, (hi * c_hi + lo * s_hi).to(dst.dtype.element_ty))

    @triton.jit
    def _rope_write_kernel(Q, K, V, COS, SIN, QO, SK, SV, IDX, H,
                           sq_h, sq_t, sk_h, sk_t, sv_h, sv_t, sc_t, sqo_h, sqo_t, ssk_h, ssk_s, ssv_h, ssv_s,
                           HALF: tl.constexpr):
        t, h = tl.program_id(0), tl.program_id(1)
        d = tl.arange(0, HALF)
        c_lo = tl.load(COS + t * sc_t + d).to(tl.float32)
        c_hi = tl.load(COS + t * sc_t + HALF + d).to(tl.float32)
        s_lo = tl.load(SIN + t * sc_t + d).to(tl.float32)
        s_hi = tl.load(SIN + t * sc_t + HALF + d).to(tl.float32)
        if h < H:  # a query head: rotate into QO
            _rotate(Q + h * sq_h + t * sq_t, QO + h * sqo_h + t * sqo_t, d, c_lo, c_hi, s_lo, s_hi, HALF)
        else:  # a KV head: rotate the key, store it and the value at row idx[t]
            kh = h - H
            row = tl.load(IDX + t)
            _rotate(K + kh * sk_h + t * sk_t, SK + kh * ssk_h + row * ssk_s, d, c_lo, c_hi, s_lo, s_hi, HALF)
            vx = V + kh * sv_h + t * sv_t
            vo = SV + kh * ssv_h + row * ssv_s
            tl.store(vo + d, tl.load(vx + d))
            tl.store(vo + HALF + d, tl.load(vx + HALF + d))


def rope_write_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         store_k: torch.Tensor, store_v: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    q, k = rope_qk(q, k, cos, sin)
    store_k.index_copy_(1, idx, k[0])
    store_v.index_copy_(1, idx, v[0])
    return q


def rope_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               store_k: torch.Tensor, store_v: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rotated q [1, H, T, D]; k rotated and v written to store_k/store_v [KVH, S, D] at rows idx [T].

    q/k/v may be strided views of the fused qkv projection (last dim contiguous); cos/sin [T, D].
    """
    _, h, t, d = q.shape
    kvh = k.shape[1]
    if not use_triton(q, k, v, store_k, store_v) or d < 16 or d & (d - 1):
        return rope_write_reference(q, k, v, cos, sin, store_k, store_v, idx)
    if any(x.stride(-1) != 1 for x in (q, k, v, cos, sin, store_k, store_v)):
        raise ValueError("rope_write needs a contiguous head_dim axis on every tensor")
    if store_k.shape[0] != kvh or idx.numel() != t:
        raise ValueError(f"rope_write: store {tuple(store_k.shape)} / idx {tuple(idx.shape)} do not match "
                         f"{kvh} KV heads and {t} tokens")
    qo = torch.empty(1, h, t, d, dtype=q.dtype, device=q.device)
    _rope_write_kernel[(t, h + kvh)](
        q, k, v, cos, sin, qo, store_k, store_v, idx, h,
        q.stride(1), q.stride(2), k.stride(1), k.stride(2), v.stride(1), v.stride(2), cos.stride(0),
        qo.stride(1), qo.stride(2), store_k.stride(0), store_k.stride(1), store_v.stride(0), store_v.stride(1),
        HALF=d // 2, num_warps=1)
    return qo
