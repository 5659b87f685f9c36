"""Decode-step GEMV: y = x @ W^T for a few rows of x (M <= 32) against a large weight.

A decode or verify step reads every weight once for 1-32 tokens, so the matmul is a GEMV bound by
the weight's bytes. One program per BLOCK_N output rows streams their full K: a multiply-add per
element for one row, tl.dot for several. Which path and blocks a shape takes comes from sweeps
(`one_row_config`, `dot_config`): one row always beats cuBLAS (H100, 7B shapes: 2.5-3.05 vs
2.05-2.7 TB/s; H200, Qwen2.5 0.5B/1.5B shapes: 1.2-2.7x faster); several rows beat it on small
weights and lose on a 7B's, which then stay on cuBLAS.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import next_pow2, pdl_wait, target_programs, tl, triton, use_pdl, use_triton

MAX_ROWS = 16  # the rows of x the fused and quantized programs hold (tl.dot needs >= 16 on a side)
GEMV_MAX_ROWS = 32  # this GEMV also takes a batch's decode step, in programs of 32 rows

if triton is not None:

    @triton.jit
    def _gemv_acc(acc, w, X, k, k_ok, m, M, sxm, DOT: tl.constexpr):
        """acc + x[:, k] . w for one BLOCK_K slice of the weight."""
        if DOT:  # several rows: tensor cores on [BLOCK_M, BLOCK_K] x [BLOCK_K, BLOCK_N]
            x = tl.load(X + m[:, None] * sxm + k[None, :], mask=(m[:, None] < M) & k_ok[None, :], other=0.0)
            acc += tl.dot(x, tl.trans(w.to(x.dtype)))  # int8 values are exact in bf16/fp16
        else:  # one row: a multiply-add per weight element
            x = tl.load(X + k, mask=k_ok, other=0.0)
            acc += tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], 1)
        return acc

    @triton.jit
    def _gemv_kernel(X, W, S, B, Y, M, N, K, sxm, swn, sym,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT: tl.constexpr,
                     SCALED: tl.constexpr = False, HAS_BIAS: tl.constexpr = False, PDL: tl.constexpr = False):
        # y = (x @ W^T) * S[n] (SCALED: an int8 weight's per-row scale) + B[n] (HAS_BIAS)
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        m = tl.arange(0, BLOCK_M)
        n_ok = n < N
        if DOT:
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        else:
            acc = tl.zeros([BLOCK_N], tl.float32)
        # the first weight slice is read before waiting for the kernel that writes x (PDL)
        k = tl.arange(0, BLOCK_K)
        k_ok = k < K
        w = tl.load(W + n[:, None] * swn + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0)
        pdl_wait(PDL)
        acc = _gemv_acc(acc, w, X, k, k_ok, m, M, sxm, DOT)
        for k0 in range(BLOCK_K, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < K
            w = tl.load(W + n[:, None] * swn + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0)
            acc = _gemv_acc(acc, w, X, k, k_ok, m, M, sxm, DOT)
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


def gemv_reference(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, w, bias)


SMALL_WEIGHT = 32 << 20  # elements: a 0.5B-1.5B model's projections are below it, a 7B's q/k/v, gate/up, down above


def one_row_config(n: int, k: int, x: torch.Tensor) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, warps) of the one-row (FMA) path.

    Large weights (a 7B's q/k/v, gate/up and down, LM heads): 8 rows x 1024 per step, 8 warps (an
    H100 sweep over the 7B shapes). Small ones (a 0.5B-1.5B model's projections, a GEMV of a few microseconds): enough
    programs for two waves of SMs (fewer output rows each where N is small), and the whole of a short
    K in one slice, which with dependent launch is read before the kernel ahead of it ends (an H200
    sweep over the Qwen2.5 0.5B/1.5B shapes in 24-28-weight chains: up to 1.3x faster)."""
    if n * k >= SMALL_WEIGHT:
        return 8, 1024, 8
    sms = target_programs(x) // 2
    block_n = 8
    while block_n > 2 and triton.cdiv(n, block_n) < 2 * sms:
        block_n //= 2
    block_k = 512 if n >= 8192 else min(2048, next_pow2(k))
    return block_n, block_k, (8 if block_k >= 2048 else 4)


def dot_config(m: int, n: int, k: int, x: torch.Tensor) -> tuple[int, int, int] | None:
    """(BLOCK_M, BLOCK_N, BLOCK_K) of the several-row (tl.dot) path, or None where cuBLAS is faster.

    From H200 sweeps (chains of 16-28 distinct weights under a CUDA graph, 2-32 rows): on a 7B's
    large weights cuBLAS wins by 10-35% (q/k/v 28.3 vs 38.8 us, gate/up 46.6 vs 60.2 at 5 rows);
    on a 0.5B-1.5B model's small ones this kernel wins (q/k/v 3.1 vs 4.2 us, o 2.8 vs 4.5) with
    narrow programs: 16 output rows and 256 per K step, or 32 x 128 where N fills two waves of SMs.
    It loses only where few programs each stream a long K (a small model's down projection):
    cuBLAS splits K there, this kernel does not."""
    if n * k >= SMALL_WEIGHT:
        return None
    sms = target_programs(x) // 2
    block_n = 32 if triton.cdiv(n, 32) >= 2 * sms else 16
    if triton.cdiv(n, block_n) < sms and block_n * k * x.element_size() > 64 * 1024:
        return None
    return (MAX_ROWS if m <= MAX_ROWS else GEMV_MAX_ROWS), block_n, (128 if block_n == 32 else 256)


def gemv_triton(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] (M <= 32, last dim contiguous) times w [N, K]^T (rows contiguous) (+ bias [N]) -> [M, N]."""
    m, k = x.shape
    n = w.shape[0]
    if m > GEMV_MAX_ROWS or w.shape[1] != k or x.stride(1) != 1 or w.stride(1) != 1:
        raise ValueError(f"gemv_triton takes x [<= {GEMV_MAX_ROWS}, K] and w [N, K] with contiguous rows, "
                         f"got {tuple(x.shape)} and {tuple(w.shape)}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"gemv_triton: bias {tuple(bias.shape)} must have the weight's {n} rows")
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 1:
        (block_n, block_k, warps), block_m, dot = one_row_config(n, k, x), MAX_ROWS, False
    else:
        block_m, block_n, block_k = dot_config(m, n, k, x) or (MAX_ROWS if m <= MAX_ROWS else GEMV_MAX_ROWS, 16, 256)
        warps, dot = 4, True
    pdl = use_pdl(x, n * k * w.element_size())
    _gemv_kernel[(triton.cdiv(n, block_n),)](x, w, w, bias if bias is not None else w, y, m, n, k, x.stride(0),
                                             w.stride(0), y.stride(0), BLOCK_M=block_m, BLOCK_N=block_n,
                                             BLOCK_K=block_k, DOT=dot, HAS_BIAS=bias is not None,
                                             PDL=pdl, launch_pdl=pdl, num_stages=3, num_warps=warps)
    return y


def gemv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, w, bias) for x [..., K]: the Triton GEMV for <= 32 rows of bf16/fp16 on CUDA where
    `dot_config` says it is faster, cuBLAS otherwise (float32 keeps cuBLAS: tl.dot rounds via TF32)."""
    rows = x.numel() // x.shape[-1]
    if (rows <= GEMV_MAX_ROWS and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
            and use_triton(x, w) and w.stride(-1) == 1
            and (rows == 1 or dot_config(rows, w.shape[0], w.shape[1], x) is not None)):
        return gemv_triton(x.reshape(rows, x.shape[-1]), w, bias).view(*x.shape[:-1], w.shape[0])
    return F.linear(x, w, bias)
