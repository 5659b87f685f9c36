"""RoPE of a step's queries and keys fused with the write of its keys and values into the KV store.

Under CUDA graphs a decode step costs about one launch per small kernel; per layer, rotating q
and k and the two `index_copy_` writes of k and v were three of them (~2.5 us each, 0.2 ms of a
7B retrieval-tier step). Here one program per (sequence, token, head) rotates a query head, or
rotates a key head and writes it with its value head to store rows `idx[b, t]`: one launch per
layer, for one sequence or a batch of them (each at its own positions). Math in float32, rounded
once, as the compiled `rope_qk` does.
"""
from __future__ import annotations

import torch

from triforce.models.llama import rope_qk

from ._common import pdl_wait, rotate_half, tl, triton, use_pdl, use_triton

if triton is not None:

    @triton.jit
    def _rotate(src, dst, d, c_lo, c_hi, s_lo, s_hi, HALF: tl.constexpr):
        """dst <- src rotated (rotate-half layout), float32 math, one rounding."""
        lo, hi = rotate_half(tl.load(src + d), tl.load(src + HALF + d), c_lo, c_hi, s_lo, s_hi)
        tl.store(dst + d, lo.to(dst.dtype.element_ty))
        tl.store(dst + HALF + d, hi.to(dst.dtype.element_ty))

    @triton.jit
    def _rope_write_kernel(Q, K, V, COS, SIN, QO, SK, SV, IDX, H, T,
                           sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, sc_b, sc_t, ss_b, ss_t,
                           sqo_b, sqo_h, sqo_t, ssk_b, ssk_h, ssk_s, ssv_b, ssv_h, ssv_s, si_b, si_t,
                           HALF: tl.constexpr, PDL: tl.constexpr = False):
        pdl_wait(PDL)
        bt, h = tl.program_id(0), tl.program_id(1)  # bt = b * T + t
        b, t = (bt // T).to(tl.int64), bt % T  # int64: b * ssk_b can pass 2**31 in a [B, L, ...] store
        d = tl.arange(0, HALF)
        c, sn = COS + b * sc_b + t * sc_t, SIN + b * ss_b + t * ss_t
        c_lo = tl.load(c + d).to(tl.float32)
        c_hi = tl.load(c + HALF + d).to(tl.float32)
        s_lo = tl.load(sn + d).to(tl.float32)
        s_hi = tl.load(sn + HALF + d).to(tl.float32)
        if h < H:  # a query head: rotate into QO
            _rotate(Q + b * sq_b + h * sq_h + t * sq_t, QO + b * sqo_b + h * sqo_h + t * sqo_t,
                    d, c_lo, c_hi, s_lo, s_hi, HALF)
        else:  # a KV head: rotate the key, store it and the value at row idx[b, t]
            kh = h - H
            row = tl.load(IDX + b * si_b + t * si_t)
            _rotate(K + b * sk_b + kh * sk_h + t * sk_t, SK + b * ssk_b + kh * ssk_h + row * ssk_s,
                    d, c_lo, c_hi, s_lo, s_hi, HALF)
            vx = V + b * sv_b + kh * sv_h + t * sv_t
            vo = SV + b * ssv_b + kh * ssv_h + row * ssv_s
            tl.store(vo + d, tl.load(vx + d))
            tl.store(vo + HALF + d, tl.load(vx + HALF + d))


def rope_write_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         store_k: torch.Tensor, store_v: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    if store_k.dim() == 3:  # one sequence: cos/sin [T, D], store [KVH, S, D], idx [T]
        q, k = rope_qk(q, k, cos, sin)
        store_k.index_copy_(1, idx, k[0])
        store_v.index_copy_(1, idx, v[0])
        return q
    q, k = rope_qk(q, k, cos[:, None], sin[:, None])
    for b in range(q.shape[0]):
        store_k[b].index_copy_(1, idx[b], k[b])
        store_v[b].index_copy_(1, idx[b], v[b])
    return q


def rope_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               store_k: torch.Tensor, store_v: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rotated q [B, H, T, D]; k rotated and v written to store_k/store_v [B, KVH, S, D] at rows idx [B, T].

    q/k/v [B, heads, T, D] may be strided views of the fused qkv projection; cos/sin [B, T, D] (each
    sequence at its own positions); every tensor needs a contiguous last dim. One sequence may also
    come as B=1 with cos/sin [T, D], store [KVH, S, D] and idx [T].
    """
    b, h, t, d = q.shape
    kvh = k.shape[1]
    if not use_triton(q, k, v, store_k, store_v) or d < 16 or d & (d - 1):
        return rope_write_reference(q, k, v, cos, sin, store_k, store_v, idx)
    if any(x.stride(-1) != 1 for x in (q, k, v, cos, sin, store_k, store_v)):
        raise ValueError("rope_write needs a contiguous head_dim axis on every tensor")
    if store_k.dim() == 3:  # one sequence, as B=1
        cos, sin, store_k, store_v, idx = cos[None], sin[None], store_k[None], store_v[None], idx[None]
    if (k.shape[:3] != (b, kvh, t) or v.shape != k.shape or cos.shape[:2] != (b, t) or sin.shape != cos.shape
            or store_k.shape[:2] != (b, kvh) or store_v.shape != store_k.shape or idx.shape != (b, t)):
        raise ValueError(f"rope_write: store {tuple(store_k.shape)} / idx {tuple(idx.shape)} / k {tuple(k.shape)} / "
                         f"cos {tuple(cos.shape)} do not match {b} sequences, {kvh} KV heads and {t} tokens")
    qo = torch.empty(b, h, t, d, dtype=q.dtype, device=q.device)
    pdl = use_pdl(q)
    _rope_write_kernel[(b * t, h + kvh)](
        q, k, v, cos, sin, qo, store_k, store_v, idx, h, t,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *cos.stride()[:2], *sin.stride()[:2],
        *qo.stride()[:3], *store_k.stride()[:3], *store_v.stride()[:3], *idx.stride(),
        HALF=d // 2, PDL=pdl, launch_pdl=pdl, num_warps=1)
    return qo
