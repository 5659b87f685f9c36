"""Decode-step GEMV: y = x @ W^T for a few rows of x (M <= 16) against a large weight.

A decode or verify step reads every weight once for 1-16 tokens, so the matmul is a GEMV bound by
the weight's bytes. One program per BLOCK_N output rows streams their full K. Measured on the
H100 (bf16, weights rotated out of L2, one token; .diag sweep in the speed-bench notes), against
cuBLAS: fused q/k/v 12288x4096 2.86 vs 2.64 TB/s, o 4096x4096 2.51 vs 2.05, gate/up 22016x4096
2.95 vs 2.52, down 4096x11008 2.69 vs 2.52, LM head 32000x4096 3.05 vs 2.71; small models'
shapes (768-6144 rows) also win at one token. With 7 tokens the 7B q/k/v is ~3% slower than
cuBLAS and small models' gate/up 5-20% (microseconds), every other shape faster, so the model uses
it for every projection of a decode/verify step: one rule, not a table per shape.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import tl, triton, use_triton

MAX_ROWS = 16  # the rows of x one program holds (tl.dot needs >= 16 on a side)

if triton is not None:

    @triton.jit
    def _gemv_kernel(X, W, S, B, Y, M, N, K, sxm, swn, sym,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT: tl.constexpr,
                     SCALED: tl.constexpr = False, HAS_BIAS: tl.constexpr = False):
        # y = (x @ W^T) * S[n] (SCALED: an int8 weight's per-row scale) + B[n] (HAS_BIAS)
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        m = tl.arange(0, BLOCK_M)
        n_ok = n < N
        if DOT:  # several rows: tensor cores on [BLOCK_M, BLOCK_K] x [BLOCK_K, BLOCK_N]
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        else:  # one row: a multiply-add per weight element
            acc = tl.zeros([BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < K
            w = tl.load(W + n[:, None] * swn + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0)
            if DOT:
                x = tl.load(X + m[:, None] * sxm + k[None, :], mask=(m[:, None] < M) & k_ok[None, :], other=0.0)
                acc += tl.dot(x, tl.trans(w.to(x.dtype)))  # int8 values are exact in bf16/fp16
            else:
                x = tl.load(X + k, mask=k_ok, other=0.0)
                acc += tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], 1)
        if DOT:
            if SCALED:
                acc = acc * tl.load(S + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            if HAS_BIAS:
                acc += tl.load(B + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(Y + m[:, None] * sym + n[None, :], acc.to(Y.dtype.element_ty), mask=(m[:, None] < M) & n_ok[None, :])
        else:
            if SCALED:
                acc = acc * tl.load(S + n, mask=n_ok, other=0.0).to(tl.float32)
            if HAS_BIAS:
                acc += tl.load(B + n, mask=n_ok, other=0.0).to(tl.float32)
            tl.store(Y + n, acc.to(Y.dtype.element_ty), mask=n_ok)


def gemv_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w)


def gemv_triton(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [M, K] (M <= 16, last dim contiguous) times w [N, K]^T (rows contiguous) -> [M, N]."""
    m, k = x.shape
    n = w.shape[0]
    if m > MAX_ROWS or w.shape[1] != k or x.stride(1) != 1 or w.stride(1) != 1:
        raise ValueError(f"gemv_triton takes x [<= {MAX_ROWS}, K] and w [N, K] with contiguous rows, "
                         f"got {tuple(x.shape)} and {tuple(w.shape)}")
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    # best of a sweep on the H100 over the 7B shapes (bf16): one row (FMA) / several rows (tl.dot)
    block_n, warps, block_k, dot = (8, 8, 1024, False) if m == 1 else (32, 4, 512, True)
    _gemv_kernel[(triton.cdiv(n, block_n),)](x, w, w, w, y, m, n, k, x.stride(0), w.stride(0), y.stride(0),
                                             BLOCK_M=MAX_ROWS, BLOCK_N=block_n, BLOCK_K=block_k, DOT=dot,
                                             num_stages=3, num_warps=warps)
    return y


def gemv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, w, bias) for x [..., K]: the Triton GEMV for <= 16 rows of bf16/fp16 on CUDA without
    a bias (where it was measured), cuBLAS otherwise (float32 keeps cuBLAS: tl.dot rounds via TF32)."""
    rows = x.numel() // x.shape[-1]
    if (bias is None and rows <= MAX_ROWS and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
            and use_triton(x, w) and w.stride(-1) == 1):
        return gemv_triton(x.reshape(rows, x.shape[-1]), w).view(*x.shape[:-1], w.shape[0])
    return F.linear(x, w, bias)
