"""Decode-step GEMVs with the elementwise work before them fused into their prologue.

A small model's decode step under CUDA graphs is bound by its kernel count (each costs a few us
of launch, tail and ramp), not by bytes. Two of the ~10 kernels per layer only prepare a GEMV's
input, and every GEMV program reads that whole input row anyway, so they fold in for free:

- `add_norm_gemv`: residual add + RMSNorm + projection (q/k/v with bias, gate/up, LM head).
  RMSNorm's scale is one scalar per row, so each program accumulates sum(x^2) beside W.(x*g) and
  scales at the end: y = rsqrt(mean(x^2) + eps) * W.(x*g) (+ bias). With a delta, x = x + delta
  (rounded to the input dtype, as the unfused add) and program 0 writes that new residual.
- `swiglu_gemv`: the down projection of silu(gate) * up, computed from the gate/up GEMV's output
  chunk by chunk.
- `add_norm_gemv_rope`: `add_norm_gemv` of the q/k/v projection whose epilogue is `rope_write`:
  each program computes dims [j, j + b) and [j + D/2, j + D/2 + b) of one head (the pairs RoPE
  mixes), rotates a query head into q, rotates a key head and writes it, or writes a value head,
  straight into the KV store. One launch per layer fewer; one row (a decode step) only.

Conventions as `gemv.py`: x holds <= 16 rows (one FMA path for one row, tl.dot for several), the
model uses them for bf16/fp16 on CUDA only; float32 keeps the reference (cuBLAS) path. Each kernel
sits beside its PyTorch reference, which is exactly the unfused model's math.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import HAS_TRITON, pdl_wait, rotate_half, tl, triton, use_pdl
from .gemv import MAX_ROWS, dot_config, one_row_config

if triton is not None:

    @triton.jit
    def _one_row_input(X, DELTA, G, RES, k, k_ok, write_res, HAS_DELTA: tl.constexpr):
        """One row's BLOCK_K slice of the projection input: (x, x * g) in float32, x = X (+ DELTA,
        rounded to the input dtype as the unfused add rounds it, and stored to RES by `write_res`)."""
        x = tl.load(X + k, mask=k_ok, other=0.0)
        if HAS_DELTA:
            x = (x.to(tl.float32) + tl.load(DELTA + k, mask=k_ok, other=0.0).to(tl.float32)).to(X.dtype.element_ty)
            if write_res:
                tl.store(RES + k, x, mask=k_ok)
        xf = x.to(tl.float32)
        return xf, xf * tl.load(G + k, mask=k_ok, other=0.0).to(tl.float32)

    @triton.jit
    def _add_norm_acc(acc, ss, w, X, DELTA, G, RES, k, k_ok, m, M, sxm, sdm, srm, write_res,
                      HAS_DELTA: tl.constexpr, DOT: tl.constexpr):
        """One BLOCK_K slice: (acc + (x*g) . w, ss + x^2), x = X (+ DELTA, stored to RES by `write_res`)."""
        if DOT:
            g = tl.load(G + k, mask=k_ok, other=0.0).to(tl.float32)
            ok = (m[:, None] < M) & k_ok[None, :]
            x = tl.load(X + m[:, None] * sxm + k[None, :], mask=ok, other=0.0)
            if HAS_DELTA:  # the residual add, rounded as the unfused add rounds it
                d = tl.load(DELTA + m[:, None] * sdm + k[None, :], mask=ok, other=0.0)
                x = (x.to(tl.float32) + d.to(tl.float32)).to(X.dtype.element_ty)
                if write_res:
                    tl.store(RES + m[:, None] * srm + k[None, :], x, mask=ok)
            xf = x.to(tl.float32)
            ss += tl.sum(xf * xf, 1)
            acc += tl.dot((xf * g[None, :]).to(w.dtype), tl.trans(w))
        else:
            xf, xg = _one_row_input(X, DELTA, G, RES, k, k_ok, write_res, HAS_DELTA)
            ss += xf * xf
            acc += tl.sum(w.to(tl.float32) * xg[None, :], 1)
        return acc, ss

    @triton.jit
    def _add_norm_gemv_kernel(X, DELTA, G, W, BIAS, Y, RES, M, N, K, sxm, sdm, swn, sym, srm, eps,
                              HAS_DELTA: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT: tl.constexpr,
                              PDL: tl.constexpr = False):
        pid = tl.program_id(0)
        n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < N
        m = tl.arange(0, BLOCK_M)
        if DOT:  # several rows: tensor cores on [BLOCK_M, BLOCK_K] x [BLOCK_K, BLOCK_N]
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            ss = tl.zeros([BLOCK_M], tl.float32)
        else:  # one row: a multiply-add per weight element
            acc = tl.zeros([BLOCK_N], tl.float32)
            ss = tl.zeros([BLOCK_K], tl.float32)
        # the first weight slice is read before waiting for the kernels that write x and delta (PDL)
        k = tl.arange(0, BLOCK_K)
        k_ok = k < K
        w = tl.load(W + n[:, None] * swn + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        pdl_wait(PDL)
        acc, ss = _add_norm_acc(acc, ss, w, X, DELTA, G, RES, k, k_ok, m, M, sxm, sdm, srm, pid == 0, HAS_DELTA, DOT)
        for k0 in range(BLOCK_K, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < K
            w = tl.load(W + n[:, None] * swn + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            acc, ss = _add_norm_acc(acc, ss, w, X, DELTA, G, RES, k, k_ok, m, M, sxm, sdm, srm, pid == 0,
                                    HAS_DELTA, DOT)
        if HAS_BIAS:
            b = tl.load(BIAS + n, mask=n_ok, other=0.0).to(tl.float32)
        else:
            b = tl.zeros([BLOCK_N], tl.float32)
        if DOT:
            acc = acc * tl.rsqrt(ss / K + eps)[:, None] + b[None, :]
            tl.store(Y + m[:, None] * sym + n[None, :], acc.to(Y.dtype.element_ty), mask=(m[:, None] < M) & n_ok[None, :])
        else:
            acc = acc * tl.rsqrt(tl.sum(ss, 0) / K + eps) + b
            tl.store(Y + n, acc.to(Y.dtype.element_ty), mask=n_ok)

    @triton.jit
    def _add_norm_acc_pair(acc_lo, acc_hi, ss, w_lo, w_hi, X, DELTA, G, RES, k, k_ok, write_res,
                           HAS_DELTA: tl.constexpr):
        """`_add_norm_acc` of one row for two weight tiles (a head's paired dims) sharing one x slice."""
        xf, xg = _one_row_input(X, DELTA, G, RES, k, k_ok, write_res, HAS_DELTA)
        ss += xf * xf
        acc_lo += tl.sum(w_lo.to(tl.float32) * xg[None, :], 1)
        acc_hi += tl.sum(w_hi.to(tl.float32) * xg[None, :], 1)
        return acc_lo, acc_hi, ss

    @triton.jit
    def _add_norm_gemv_rope_kernel(X, DELTA, G, W, BIAS, RES, QO, SK, SV, COS, SIN, IDX, K, swn, eps, H, KVH,
                                   sqo_h, ssk_h, ssk_s, ssv_h, ssv_s,
                                   HAS_DELTA: tl.constexpr, HAS_BIAS: tl.constexpr, D: tl.constexpr,
                                   BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr = False):
        HALF: tl.constexpr = D // 2
        pid = tl.program_id(0)
        head = pid // (HALF // BLOCK_H)  # q heads, then k heads, then v heads, as the fused weight's rows
        d = (pid % (HALF // BLOCK_H)) * BLOCK_H + tl.arange(0, BLOCK_H)  # dims in the head's first half
        n_lo = head * D + d
        n_hi = n_lo + HALF
        acc_lo = tl.zeros([BLOCK_H], tl.float32)
        acc_hi = tl.zeros([BLOCK_H], tl.float32)
        ss = tl.zeros([BLOCK_K], tl.float32)
        # the first weight slices are read before waiting for the kernels that write x and delta (PDL)
        k = tl.arange(0, BLOCK_K)
        k_ok = k < K
        w_lo = tl.load(W + n_lo[:, None] * swn + k[None, :], mask=k_ok[None, :], other=0.0)
        w_hi = tl.load(W + n_hi[:, None] * swn + k[None, :], mask=k_ok[None, :], other=0.0)
        pdl_wait(PDL)
        acc_lo, acc_hi, ss = _add_norm_acc_pair(acc_lo, acc_hi, ss, w_lo, w_hi, X, DELTA, G, RES, k, k_ok,
                                                pid == 0, HAS_DELTA)
        for k0 in range(BLOCK_K, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < K
            w_lo = tl.load(W + n_lo[:, None] * swn + k[None, :], mask=k_ok[None, :], other=0.0)
            w_hi = tl.load(W + n_hi[:, None] * swn + k[None, :], mask=k_ok[None, :], other=0.0)
            acc_lo, acc_hi, ss = _add_norm_acc_pair(acc_lo, acc_hi, ss, w_lo, w_hi, X, DELTA, G, RES, k, k_ok,
                                                    pid == 0, HAS_DELTA)
        scale = tl.rsqrt(tl.sum(ss, 0) / K + eps)
        acc_lo = acc_lo * scale
        acc_hi = acc_hi * scale
        if HAS_BIAS:
            acc_lo += tl.load(BIAS + n_lo).to(tl.float32)
            acc_hi += tl.load(BIAS + n_hi).to(tl.float32)
        # rounded to the activations' dtype, as the projection's output is before RoPE reads it
        lo = acc_lo.to(QO.dtype.element_ty)
        hi = acc_hi.to(QO.dtype.element_ty)
        if head < H + KVH:  # q or k: rotate (float32 math, one rounding, as rope_write)
            c_lo = tl.load(COS + d).to(tl.float32)
            c_hi = tl.load(COS + HALF + d).to(tl.float32)
            s_lo = tl.load(SIN + d).to(tl.float32)
            s_hi = tl.load(SIN + HALF + d).to(tl.float32)
            r_lo, r_hi = rotate_half(lo, hi, c_lo, c_hi, s_lo, s_hi)
            if head < H:
                tl.store(QO + head * sqo_h + d, r_lo.to(QO.dtype.element_ty))
                tl.store(QO + head * sqo_h + HALF + d, r_hi.to(QO.dtype.element_ty))
            else:
                row = tl.load(IDX).to(tl.int64)
                dst = SK + (head - H) * ssk_h + row * ssk_s
                tl.store(dst + d, r_lo.to(SK.dtype.element_ty))
                tl.store(dst + HALF + d, r_hi.to(SK.dtype.element_ty))
        else:  # v: written as projected
            row = tl.load(IDX).to(tl.int64)
            dst = SV + (head - H - KVH) * ssv_h + row * ssv_s
            tl.store(dst + d, lo.to(SV.dtype.element_ty))
            tl.store(dst + HALF + d, hi.to(SV.dtype.element_ty))

    @triton.jit
    def _swiglu_acc(acc, w, GU, k, k_ok, m, M, sgm, K, DOT: tl.constexpr):
        """acc + silu(gate) * up . w for one BLOCK_K slice."""
        if DOT:
            ok = (m[:, None] < M) & k_ok[None, :]
            gate = tl.load(GU + m[:, None] * sgm + k[None, :], mask=ok, other=0.0).to(tl.float32)
            up = tl.load(GU + m[:, None] * sgm + K + k[None, :], mask=ok, other=0.0).to(tl.float32)
            h = (gate * tl.sigmoid(gate) * up).to(GU.dtype.element_ty)  # rounded once, as the compiled swiglu
            acc += tl.dot(h.to(w.dtype), tl.trans(w))
        else:
            gate = tl.load(GU + k, mask=k_ok, other=0.0).to(tl.float32)
            up = tl.load(GU + K + k, mask=k_ok, other=0.0).to(tl.float32)
            h = (gate * tl.sigmoid(gate) * up).to(GU.dtype.element_ty).to(tl.float32)
            acc += tl.sum(w.to(tl.float32) * h[None, :], 1)
        return acc

    @triton.jit
    def _swiglu_gemv_kernel(GU, W, Y, M, N, K, sgm, swn, sym,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT: tl.constexpr,
                            PDL: tl.constexpr = False):
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < N
        m = tl.arange(0, BLOCK_M)
        if DOT:
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        else:
            acc = tl.zeros([BLOCK_N], tl.float32)
        k = tl.arange(0, BLOCK_K)  # the first weight slice before the wait for gate_up (PDL)
        k_ok = k < K
        w = tl.load(W + n[:, None] * swn + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        pdl_wait(PDL)
        acc = _swiglu_acc(acc, w, GU, k, k_ok, m, M, sgm, K, DOT)
        for k0 in range(BLOCK_K, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < K
            w = tl.load(W + n[:, None] * swn + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            acc = _swiglu_acc(acc, w, GU, k, k_ok, m, M, sgm, K, DOT)
        if DOT:
            tl.store(Y + m[:, None] * sym + n[None, :], acc.to(Y.dtype.element_ty), mask=(m[:, None] < M) & n_ok[None, :])
        else:
            tl.store(Y + n, acc.to(Y.dtype.element_ty), mask=n_ok)


def supported(x: torch.Tensor) -> bool:
    """Where the model uses these kernels: one row (a decode step) of bf16/fp16 on CUDA (float32
    keeps cuBLAS: tl.dot would round it through TF32).

    The kernels take up to MAX_ROWS rows, but their several-row (tl.dot) path is 2-5x slower than
    the compiled add + norm and a GEMV (H200, Qwen2.5 0.5B/1.5B q/k/v and gate/up at 5 and 16 rows:
    13-100 against 7-21 us), while the one-row path saved 8% of a 0.5B decode step, so verify and
    batched steps keep the unfused kernels until the several-row path is tuned.
    """
    return (HAS_TRITON and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
            and x.numel() // x.shape[-1] == 1)


def _config(rows: int, n: int, k: int, x: torch.Tensor) -> tuple[int, int, int, bool]:
    """(BLOCK_N, warps, BLOCK_K, DOT) by shape: `gemv.py`'s rules (its sweeps' configs)."""
    if rows == 1:
        block_n, block_k, warps = one_row_config(n, k, x)
        return block_n, warps, block_k, False
    _, block_n, block_k = dot_config(rows, n, k, x) or (MAX_ROWS, 16, 256)
    return block_n, 4, block_k, True


def _rows(x: torch.Tensor, name: str) -> torch.Tensor:
    k = x.shape[-1]
    x2 = x.reshape(x.numel() // k, k)
    if x2.shape[0] > MAX_ROWS or x2.stride(1) != 1:
        raise ValueError(f"{name} takes at most {MAX_ROWS} rows with a contiguous last dim, got {tuple(x.shape)}")
    return x2


def add_norm_gemv_reference(x: torch.Tensor, delta: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                            w: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, F.linear(rms_norm(x + delta), w, bias)); no add when delta is None (x comes back)."""
    if delta is not None:
        x = x + delta
    h = x.float()
    h = norm_weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return x, F.linear(h, w, bias)


def add_norm_gemv_triton(x: torch.Tensor, delta: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                         w: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One kernel for `add_norm_gemv_reference`: x, delta [..., K] (<= 16 rows), norm_weight [K], w [N, K]."""
    x2 = _rows(x, "add_norm_gemv")
    m, k = x2.shape
    n = w.shape[0]
    if w.shape[1] != k or w.stride(1) != 1 or norm_weight.numel() != k:
        raise ValueError(f"add_norm_gemv: w {tuple(w.shape)} (rows contiguous) and norm weight "
                         f"{tuple(norm_weight.shape)} must match the input's {k} features")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"add_norm_gemv: bias {tuple(bias.shape)} must have the weight's {n} rows")
    if delta is not None and delta.shape != x.shape:
        raise ValueError(f"add_norm_gemv: delta {tuple(delta.shape)} must have the shape of x {tuple(x.shape)}")
    d2 = _rows(delta, "add_norm_gemv") if delta is not None else x2
    res = torch.empty_like(x2) if delta is not None else x2
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    block_n, warps, block_k, dot = _config(m, n, k, x)
    pdl = use_pdl(x, n * k * w.element_size())
    _add_norm_gemv_kernel[(triton.cdiv(n, block_n),)](
        x2, d2, norm_weight, w, bias if bias is not None else w, y, res, m, n, k,
        x2.stride(0), d2.stride(0), w.stride(0), y.stride(0), res.stride(0), eps,
        HAS_DELTA=delta is not None, HAS_BIAS=bias is not None, BLOCK_M=MAX_ROWS, BLOCK_N=block_n,
        BLOCK_K=block_k, DOT=dot, PDL=pdl, launch_pdl=pdl, num_stages=3, num_warps=warps)
    return res.view(x.shape), y.view(*x.shape[:-1], n)


def add_norm_gemv_rope_reference(x: torch.Tensor, delta: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                                 w: torch.Tensor, bias: torch.Tensor | None, n_heads: int, cos: torch.Tensor,
                                 sin: torch.Tensor, store_k: torch.Tensor, store_v: torch.Tensor,
                                 idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, rotated q [1, H, 1, D]) of one token; its rotated k and its v written to
    store_k / store_v [KVH, S, D] at row idx [1]: `add_norm_gemv` of the fused q/k/v weight, then `rope_write`."""
    from .rope_write import rope_write_reference

    kvh, d = store_k.shape[0], store_k.shape[-1]
    x, qkv = add_norm_gemv_reference(x, delta, norm_weight, eps, w, bias)
    q, k, v = qkv.reshape(1, -1, d).split((n_heads, kvh, kvh), dim=1)
    q = rope_write_reference(q[:, :, None], k[:, :, None], v[:, :, None], cos, sin, store_k, store_v, idx)
    return x, q


def add_norm_gemv_rope_triton(x: torch.Tensor, delta: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                              w: torch.Tensor, bias: torch.Tensor | None, n_heads: int, cos: torch.Tensor,
                              sin: torch.Tensor, store_k: torch.Tensor, store_v: torch.Tensor,
                              idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One kernel for `add_norm_gemv_rope_reference`: x, delta [1, 1, K]; w [(H + 2 KVH) D, K] (q, k,
    v rows); cos/sin [1, D] at the token's position; store [KVH, S, D] (head_dim contiguous); idx [1]."""
    x2 = _rows(x, "add_norm_gemv_rope")
    m, k = x2.shape
    kvh, d = store_k.shape[0], store_k.shape[-1]
    n = w.shape[0]
    if m != 1:
        raise ValueError(f"add_norm_gemv_rope takes one token, got {m} rows")
    if d < 2 or d & (d - 1) or n != (n_heads + 2 * kvh) * d or w.shape[1] != k or w.stride(1) != 1:
        raise ValueError(f"add_norm_gemv_rope: weight {tuple(w.shape)} must be {n_heads} + 2 x {kvh} heads of a "
                         f"power-of-two head_dim {d} by {k} features, rows contiguous")
    if norm_weight.numel() != k or (bias is not None and bias.shape != (n,)):
        raise ValueError(f"add_norm_gemv_rope: norm weight / bias must have {k} / {n} elements")
    if delta is not None and delta.shape != x.shape:
        raise ValueError(f"add_norm_gemv_rope: delta {tuple(delta.shape)} must have the shape of x {tuple(x.shape)}")
    if (store_v.shape != store_k.shape or cos.numel() != d or sin.numel() != d or idx.numel() != 1
            or any(t.stride(-1) != 1 for t in (store_k, store_v, cos, sin))):
        raise ValueError(f"add_norm_gemv_rope: store {tuple(store_k.shape)} / {tuple(store_v.shape)}, cos/sin of "
                         f"{d} and one write row are needed (last dims contiguous)")
    d2 = _rows(delta, "add_norm_gemv_rope") if delta is not None else x2
    res = torch.empty_like(x2) if delta is not None else x2
    q = torch.empty(1, n_heads, 1, d, dtype=x.dtype, device=x.device)
    block_n, block_k, warps = one_row_config(n, k, x)
    block_h = max(1, min(d // 2, block_n // 2))
    pdl = use_pdl(x, n * k * w.element_size())
    _add_norm_gemv_rope_kernel[(n // (2 * block_h),)](
        x2, d2, norm_weight, w, bias if bias is not None else w, res, q, store_k, store_v, cos, sin, idx, k,
        w.stride(0), eps, n_heads, kvh, q.stride(1), store_k.stride(0), store_k.stride(1),
        store_v.stride(0), store_v.stride(1),
        HAS_DELTA=delta is not None, HAS_BIAS=bias is not None, D=d, BLOCK_H=block_h, BLOCK_K=block_k,
        PDL=pdl, launch_pdl=pdl, num_stages=3, num_warps=warps)
    return res.view(x.shape), q


def swiglu_gemv_reference(gate_up: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """F.linear(silu(gate) * up, w) for gate_up [..., 2I] = [gate | up] (the fused gate/up GEMV's output)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, w)


def swiglu_gemv_triton(gate_up: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """One kernel for `swiglu_gemv_reference`: gate_up [..., 2I] (<= 16 rows), w [N, I]."""
    g2 = _rows(gate_up, "swiglu_gemv")
    m, k2 = g2.shape
    n, k = w.shape
    if k2 != 2 * k or w.stride(1) != 1:
        raise ValueError(f"swiglu_gemv: gate_up has {k2} features, the weight {tuple(w.shape)} needs 2 x {k} "
                         f"(rows contiguous)")
    y = torch.empty(m, n, dtype=gate_up.dtype, device=gate_up.device)
    block_n, warps, block_k, dot = _config(m, n, k, gate_up)
    pdl = use_pdl(gate_up, n * k * w.element_size())
    _swiglu_gemv_kernel[(triton.cdiv(n, block_n),)](
        g2, w, y, m, n, k, g2.stride(0), w.stride(0), y.stride(0),
        BLOCK_M=MAX_ROWS, BLOCK_N=block_n, BLOCK_K=block_k, DOT=dot, PDL=pdl, launch_pdl=pdl,
        num_stages=3, num_warps=warps)
    return y.view(*gate_up.shape[:-1], n)
