"""Flash-decoding core shared by `sparse_attention` (b) and `decode_attention` (c).

Few queries over many keys: one program per (key split, KV head, block of query rows) runs an
online softmax over its slice of the keys, then a reduce combines the splits by their
log-sum-exp. Splitting the keys is what spreads one decode step over all SMs. The reduce is its
own small kernel (combining the splits inside the same launch, the last split to finish doing the
combine, was measured slower on an H200 and removed). The keys are a *virtual* list: `n_sel_tok`
tokens of selected chunks (positions idx*chunk + j, read in place from the store) followed by the
contiguous tail [tail_start, tail_start + n_keys - n_sel_tok).
All query heads of a GQA group share a program, so each K/V byte is read once per KV head.
Masking is bottom-right causal over the virtual list: query t sees keys n <= n_keys - T + t
(what `triforce.cache.attention` does on the concatenated keys).
A batch of sequences folds into grid axis 1 (b * KVH + kvh), each row with its own key list and
lengths, so a batched step of sequences of different lengths is still one launch per layer.
"""
from __future__ import annotations

import torch

from ._common import HAS_TRITON, check_head_dim, next_pow2, pdl_wait, target_programs, tl, triton, use_pdl

if HAS_TRITON:

    @triton.jit
    def _partial_kernel(Q, K, V, IDX, O, LSE, NK, TS,
                        sq_b, sq_h, sq_t, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, si_b, si_h, snk, sts,
                        so_s, so_b, so_h, so_t, sl_s,
                        n_sel_tok, tail_start, n_keys, T, G, KVH, keys_per_split, scale_log2,
                        CHUNK: tl.constexpr, SPARSE: tl.constexpr, D: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        STORE_LSE: tl.constexpr, PREC: tl.constexpr, DEVICE_LEN: tl.constexpr,
                        PDL: tl.constexpr = False):
        pdl_wait(PDL)
        split, bk, mb = tl.program_id(0), tl.program_id(1), tl.program_id(2)  # bk = b * KVH + kvh
        b, kvh = (bk // KVH).to(tl.int64), bk % KVH  # int64: b * sk_b can pass 2**31 in a [B, L, ...] store
        if DEVICE_LEN:  # this row's lengths from device memory (CUDA graphs); n_keys above was only the plan's bound
            n_keys = tl.load(NK + b * snk)
            tail_start = tl.load(TS + b * sts)
        Q += b * sq_b
        K += b * sk_b + kvh * sk_h
        V += b * sv_b + kvh * sv_h
        r = mb * BLOCK_M + tl.arange(0, BLOCK_M)  # row = g * T + t inside the GQA group
        row_ok = r < G * T
        g, t = r // T, r % T
        head = kvh * G + g
        d = tl.arange(0, D)
        q = tl.load(Q + head[:, None] * sq_h + t[:, None] * sq_t + d[None, :], mask=row_ok[:, None], other=0.0)
        limit = n_keys - T + t  # last visible virtual key of each row

        m = tl.full([BLOCK_M], -1.0e30, tl.float32)  # finite: fully masked blocks give p = 0, not NaN
        l = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        lo = split * keys_per_split
        hi = tl.minimum(lo + keys_per_split, n_keys)
        for start in range(lo, hi, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            ok = n < hi
            if SPARSE:
                sel = n < n_sel_tok
                c = tl.load(IDX + b * si_b + kvh * si_h + n // CHUNK, mask=sel & ok, other=0)
                pos = tl.where(sel, c * CHUNK + n % CHUNK, tail_start + n - n_sel_tok)
            else:
                pos = tail_start + n
            k = tl.load(K + pos[:, None] * sk_s + d[None, :], mask=ok[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale_log2
            s = tl.where((n[None, :] <= limit[:, None]) & ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            p = tl.math.exp2(s - m_new[:, None])
            alpha = tl.math.exp2(m - m_new)
            l = l * alpha + tl.sum(p, 1)
            v = tl.load(V + pos[:, None] * sv_s + d[None, :], mask=ok[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
            m = m_new

        out = acc / tl.maximum(l, 1.0e-30)[:, None]
        tl.store(O + split * so_s + b * so_b + head[:, None] * so_h + t[:, None] * so_t + d[None, :],
                 out.to(O.dtype.element_ty), mask=row_ok[:, None])
        if STORE_LSE:  # log2 units; -inf where this split saw no visible key
            lse = tl.where(l > 0, m + tl.math.log2(tl.maximum(l, 1.0e-30)), float("-inf"))
            tl.store(LSE + split * sl_s + bk * G * T + r, lse, mask=row_ok)

    @triton.jit
    def _reduce_kernel(O, LSE, OUT, n_splits, T, H,
                       so_s, so_b, so_h, so_t, sl_s, sout_b, sout_h, sout_t,
                       D: tl.constexpr, BLOCK_S: tl.constexpr, PDL: tl.constexpr = False):
        pdl_wait(PDL)
        row = tl.program_id(0)  # (b * H + head) * T + t
        b, head, t = row // (H * T), row // T % H, row % T
        s = tl.arange(0, BLOCK_S)
        ok = s < n_splits
        d = tl.arange(0, D)
        lse = tl.load(LSE + s * sl_s + row, mask=ok, other=float("-inf"))
        w = tl.math.exp2(lse - tl.max(lse, 0))
        w = w / tl.sum(w, 0)
        o = tl.load(O + s[:, None] * so_s + b * so_b + head * so_h + t * so_t + d[None, :], mask=ok[:, None], other=0.0)
        tl.store(OUT + b * sout_b + head * sout_h + t * sout_t + d, tl.sum(o * w[:, None], 0).to(OUT.dtype.element_ty))


def _row_lengths(x: torch.Tensor, name: str, b: int, batched: bool) -> int:
    """Check a device length (0-d, or [B] with a batch) and return its stride between rows."""
    if x.shape != ((b,) if batched else ()) and (batched or x.numel() != 1):
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {(b,) if batched else ()} (one entry per row)")
    return x.stride(0) if batched else 0


def split_k_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_keys: int, tail_start: int,
                      chunk_idx: torch.Tensor | None = None, chunk: int = 1,
                      num_splits: int | None = None, block_n: int = 64,
                      out: torch.Tensor | None = None, num_warps: int = 4, num_stages: int | None = None,
                      n_keys_t: torch.Tensor | None = None, tail_start_t: torch.Tensor | None = None) -> torch.Tensor:
    """Launch the split-K kernels; q [H, T, D], k/v [KVH, S, D] (any strides, last dim contiguous).

    With `n_keys_t` (device scalar) the kernel reads the key count and `tail_start_t` from device
    memory, so one CUDA graph serves every length; `n_keys` is then the static upper bound the
    work split is planned for.

    Batched: q [B, H, T, D], k/v [B, KVH, S, D] (e.g. `store[:, layer]` of a [B, L, KVH, S, D]
    store), chunk_idx [B, KVH, n], n_keys_t / tail_start_t [B] int32, out [B, H, T, D]; each row
    attends its own keys with its own lengths, so one launch (and one CUDA graph) serves a batch of
    sequences of different lengths. Host ints `n_keys` / `tail_start` alone are shared by all rows.
    """
    batched = q.dim() == 4
    if q.dim() not in (3, 4) or k.dim() != q.dim() or v.dim() != q.dim():
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: expected q [(B,) H, T, D] "
                         "and k/v [(B,) KVH, S, D]")
    b = q.shape[0] if batched else 1
    h, t, d = q.shape[-3:]
    kvh = k.shape[-3]
    if k.shape[:-3] != q.shape[:-3] or v.shape[:-3] != q.shape[:-3] or v.shape[-3] != kvh:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} disagree on "
                         "batch size or KV heads")
    check_head_dim(d)
    if h % kvh:
        raise ValueError(f"{h} query heads are not a multiple of {kvh} KV heads")
    if k.stride(-1) != 1 or v.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("q/k/v need a contiguous last (head_dim) axis")
    if n_keys < t:
        raise ValueError(f"{n_keys} keys cannot hold the {t} new tokens (they are the last keys)")
    g = h // kvh
    sparse = chunk_idx is not None
    if sparse and (chunk_idx.dim() != q.dim() - 1 or chunk_idx.shape[:-1] != k.shape[:-2]):
        raise ValueError(f"chunk_idx {tuple(chunk_idx.shape)} does not match k {tuple(k.shape)}: "
                         "expected [(B,) KVH, n]")
    n_sel_tok = chunk_idx.shape[-1] * chunk if sparse else 0
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if out.shape != q.shape or out.stride(-1) != 1:
        raise ValueError(f"out {tuple(out.shape)} must have q's shape {tuple(q.shape)} and a contiguous last axis")
    # the kernels see every tensor as batched (the 3-D case is B=1)
    q4, k4, v4, out4 = (x if batched else x[None] for x in (q, k, v, out))

    n_blocks = triton.cdiv(n_keys, block_n)
    block_m = min(64, max(16, next_pow2(g * t)))
    row_blocks = triton.cdiv(g * t, block_m)
    if num_splits is None:
        num_splits = max(1, target_programs(q) // (b * kvh * row_blocks))
    per_split = triton.cdiv(n_blocks, max(1, min(num_splits, n_blocks)))
    splits = triton.cdiv(n_blocks, per_split)
    keys_per_split = per_split * block_n

    if splits == 1:  # write the result directly, no reduce
        o_part, lse, so = out4, out4, (0, *out4.stride()[:3])
    else:
        o_part = torch.empty(splits, b, h, t, d, dtype=torch.float32, device=q.device)
        lse = torch.empty(splits, b * h * t, dtype=torch.float32, device=q.device)
        so = o_part.stride()[:4]
    idx = chunk_idx.contiguous() if sparse else q  # dummy pointer when dense
    si = (idx.stride(0) if batched else 0, idx.stride(-2)) if sparse else (0, 0)
    device_len = n_keys_t is not None
    if device_len and tail_start_t is None:
        raise ValueError("n_keys_t needs tail_start_t (a device scalar, 0 when dense)")
    nk_ptr, ts_ptr, snk, sts = q, q, 0, 0  # dummies when the lengths are host ints
    if device_len:
        nk_ptr, ts_ptr = n_keys_t, tail_start_t
        snk = _row_lengths(n_keys_t, "n_keys_t", b, batched)
        sts = _row_lengths(tail_start_t, "tail_start_t", b, batched)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    pdl = use_pdl(q, b * kvh * n_keys * d * 2 * k.element_size())
    if num_stages is None:  # 3 stages measured best on H100 (bf16, D=128); fp32 tiles are twice the smem
        num_stages = 2 if k.dtype == torch.float32 else 3
    _partial_kernel[(splits, b * kvh, row_blocks)](
        q4, k4, v4, idx, o_part, lse, nk_ptr, ts_ptr,
        *q4.stride()[:3], *k4.stride()[:3], *v4.stride()[:3], *si, snk, sts,
        *so, lse.stride(0) if splits > 1 else 0,
        n_sel_tok, tail_start, n_keys, t, g, kvh, keys_per_split, d ** -0.5 * 1.4426950408889634,
        CHUNK=chunk, SPARSE=sparse, D=d, BLOCK_M=block_m, BLOCK_N=block_n,
        STORE_LSE=splits > 1, PREC=prec, DEVICE_LEN=device_len, PDL=pdl, launch_pdl=pdl, num_warps=num_warps,
        num_stages=num_stages)
    if splits > 1:
        _reduce_kernel[(b * h * t,)](o_part, lse, out4, splits, t, h, *so, lse.stride(0),
                                     *out4.stride()[:3], D=d, BLOCK_S=next_pow2(splits), PDL=pdl, launch_pdl=pdl,
                                     num_warps=4)
    return out
